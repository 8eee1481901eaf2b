"""The documented deployments, run or checked: the daemon as its own unprivileged user serving
clients of other uids through the socket's group (README "Running under systemd"), and the
Kubernetes manifests (deploy/kubernetes/)."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import shm_entries
from users import (
    CLIENT_A,
    CLIENT_B,
    DAEMON_USER,
    OUTSIDER,
    as_user,
    deployment_users,
    shared_dir,
    start_as,
    user_env,
)

from tensord.config import load_config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"

CLIENT = r"""
import os, sys, torch
from tensord.client import Client
from tensord.contract.errors import PermissionDeniedError
from tensord.models.builtin import build_mlp

try:
    c = Client(name=f"uid {os.getuid()}")  # the socket from TENSORD_SOCKET
except PermissionDeniedError as e:
    print("denied:", e, flush=True)
    sys.exit(3)
if len(sys.argv) > 1 and sys.argv[1] == "hold":
    print("ready", flush=True)
    sys.stdin.read()
g = torch.Generator().manual_seed(os.getuid())
net = build_mlp()
for i in range(50):
    x = torch.randn(1 + i % 7, 16, generator=g)
    assert torch.equal(c.infer("identity", {"x": x})["y"], x)
    torch.testing.assert_close(c.infer("mlp", {"x": x})["y"], net(x), rtol=1e-5, atol=1e-5)
c.close()
print("ok", os.getuid(), flush=True)
"""


def test_daemon_as_its_own_user_serves_clients_of_two_other_uids(go_probe):
    """README: a static `tensord` user, no capabilities, the socket mode 0660 in a directory of
    mode 0750, clients in the daemon's group. Protocol 2 failed every client of another uid
    here ("Denied permission to unlink this semaphore") and then could not restart."""
    users = deployment_users()
    d = shared_dir("tensord-deploy-")
    daemon = None
    try:
        shipped = (ROOT / "systemd" / "tensord.toml").read_text()
        config = shipped.replace("admin_uids = [0]",
                                 f"admin_uids = [{users[DAEMON_USER].pw_uid}]")
        (d / "client.py").write_text(CLIENT)
        probe = d / "shmprobe"
        shutil.copy(go_probe, probe)
        probe.chmod(0o755)
        for _ in range(2):  # and again after a restart: nothing of the first run is left
            daemon = start_as(DAEMON_USER, d, config, mode=0o750)
            with open(f"/proc/{daemon.pid}/status") as f:
                uids = next(ln for ln in f if ln.startswith("Uid:")).split()[1:]
            assert {int(u) for u in uids} == {users[DAEMON_USER].pw_uid}, uids
            st = os.stat(daemon.path)
            assert stat.S_IMODE(st.st_mode) == 0o660
            assert (st.st_uid, st.st_gid) == (users[DAEMON_USER].pw_uid,
                                              users[DAEMON_USER].pw_gid)

            env = user_env(d / "home", TENSORD_SOCKET=daemon.path)
            py = [sys.executable, str(d / "client.py")]
            # two clients of two other uids at once, both through the group
            procs = [subprocess.Popen(as_user(u, py), stdout=subprocess.PIPE, text=True,
                                      env=env) for u in (CLIENT_A, CLIENT_B)]
            go = subprocess.run(as_user(CLIENT_B, [str(probe), "-mode", "roundtrip", "-n", "50",
                                                   "-bytes", "65536"]),
                                capture_output=True, text=True, env=env, timeout=300)
            outs = [p.communicate(timeout=300)[0].strip() for p in procs]
            assert outs == [f"ok {users[CLIENT_A].pw_uid}", f"ok {users[CLIENT_B].pw_uid}"], outs
            assert go.returncode == 0 and go.stdout.strip() == "ok 50", go.stderr

            # a local user outside the group is told what to do
            r = subprocess.run(as_user(OUTSIDER, py), capture_output=True, text=True, env=env,
                               timeout=300)
            assert r.returncode == 3 and "add this user to the socket's group" in r.stdout

            # a client killed with its session open leaves nothing behind
            held = subprocess.Popen(as_user(CLIENT_A, [*py, "hold"]), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, env=env)
            assert held.stdout.readline().strip() == "ready"
            held.send_signal(signal.SIGKILL)
            held.wait()
            assert shm_entries() == []
            assert "Traceback" not in daemon.logs(), daemon.logs()
            assert daemon.stop() == 0, daemon.logs()
            daemon = None
            assert not os.path.exists(d / f"run-{DAEMON_USER}" / "tensord.sock")
    finally:
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(d)


# -- Kubernetes -----------------------------------------------------------------------------

def _docs(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def _walk(node):
    """Every mapping in a manifest, depth first."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_kubernetes_daemonset_one_daemon_per_gpu_node(tmp_path):
    docs = {d["kind"]: d for d in _docs("tensord.yaml")}
    assert {"Namespace", "ConfigMap", "DaemonSet"} <= set(docs)
    ds = docs["DaemonSet"]
    assert ds["apiVersion"] == "apps/v1"
    pod = ds["spec"]["template"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    spec = pod["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    (c,) = spec["containers"]
    # the daemon: non-root, its own group, no capabilities, no privilege, nothing shared with
    # the host but the socket directory (and read-only model files)
    assert spec["securityContext"]["runAsNonRoot"] is True
    uid, gid = spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"]
    assert uid != 0 and gid != 0
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["readOnlyRootFilesystem"] is True and "add" not in sc["capabilities"]
    assert "memory" in c["resources"]["limits"], "session memory is charged to the daemon"
    for m in _walk(ds):
        assert not m.get("hostIPC") and not m.get("hostPID") and not m.get("hostNetwork")
        assert not m.get("privileged")
    vols = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    sock_dir = mounts["socket-dir"]["mountPath"]
    assert vols["socket-dir"]["hostPath"] == {"path": "/run/tensord",
                                              "type": "DirectoryOrCreate"}
    args = c["args"]
    assert args[0] == "serve" and args[args.index("--socket") + 1] == f"{sock_dir}/tensord.sock"
    # the init container hands the socket directory to the daemon's uid, group-only
    (init,) = spec["initContainers"]
    assert f"chown {uid}:{gid} /run/tensord" in init["command"][-1]
    assert "chmod 0750" in init["command"][-1]
    assert set(init["securityContext"]["capabilities"]["add"]) <= {"CHOWN", "FOWNER"}
    # the config the DaemonSet mounts loads, and keeps the socket group-only
    toml = tmp_path / "tensord.toml"
    toml.write_text(docs["ConfigMap"]["data"]["tensord.toml"])
    cfg = load_config(str(toml))
    assert cfg.socket_mode == 0o660 and cfg.max_pending > 0
    cfg_path = args[args.index("--config") + 1]
    assert mounts["config"]["mountPath"] == os.path.dirname(cfg_path)
    assert vols["config"]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert ds["metadata"]["namespace"] == docs["Namespace"]["metadata"]["name"]


def test_kubernetes_probes_are_cheap_operator_commands_that_see_readiness(tmp_path):
    """The DaemonSet's probes are `tensord ping`/`health` against its socket; run as written
    (the socket path aside) against a real daemon they answer, and health fails once the
    daemon stops serving."""
    from conftest import start_daemon

    ds = next(d for d in _docs("tensord.yaml") if d["kind"] == "DaemonSet")
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    sock = c["args"][c["args"].index("--socket") + 1]
    probes = {k: c[k]["exec"]["command"] for k in ("startupProbe", "readinessProbe",
                                                    "livenessProbe")}
    assert probes["readinessProbe"] == ["tensord", "health", "--socket", sock]
    assert probes["livenessProbe"] == probes["startupProbe"] == ["tensord", "ping",
                                                                 "--socket", sock]
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 300
    d = start_daemon(tmp_path)
    tensord = str(Path(sys.executable).with_name("tensord"))

    def probe(kind: str) -> int:
        argv = [tensord if a == "tensord" else d.path if a == sock else a
                for a in probes[kind]]
        return subprocess.run(argv, capture_output=True, timeout=60).returncode

    try:
        assert {k: probe(k) for k in probes} == dict.fromkeys(probes, 0)
    finally:
        assert d.stop() == 0, d.logs()
    assert probe("readinessProbe") == 1 and probe("livenessProbe") == 1


def test_kubernetes_go_service_fragment_reaches_the_daemon_on_its_node():
    ds = next(d for d in _docs("tensord.yaml") if d["kind"] == "DaemonSet")
    dspec = ds["spec"]["template"]["spec"]
    (app,) = _docs("go-service.yaml")
    spec = app["spec"]["template"]["spec"]
    # on the nodes that run the daemon
    assert spec["nodeSelector"] == dspec["nodeSelector"]
    # in the daemon's group (the socket is 0660), as any non-root uid
    assert dspec["securityContext"]["runAsGroup"] in spec["securityContext"]["supplementalGroups"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    (c,) = spec["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    vol = next(v for v in spec["volumes"] if v.get("hostPath"))
    mount = next(m for m in c["volumeMounts"] if m["name"] == vol["name"])
    assert vol["hostPath"]["path"] == "/run/tensord" and mount["readOnly"] is True
    args = ds["spec"]["template"]["spec"]["containers"][0]["args"]
    daemon_sock = args[args.index("--socket") + 1]
    assert env["TENSORD_SOCKET"] == f"{mount['mountPath']}/{os.path.basename(daemon_sock)}"
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    for m in _walk(app):
        assert not m.get("hostIPC") and not m.get("privileged")
        assert m.get("medium") != "Memory", "no shared /dev/shm is needed (SPEC §3.3)"


def test_readme_documents_running_per_node():
    readme = (ROOT / "README.md").read_text()
    assert "deploy/kubernetes/" in readme and "DaemonSet" in readme
