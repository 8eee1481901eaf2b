"""Issue 12: no client can starve or stop the daemon. Each test reproduces one adversarial
scenario against a real daemon and checks the observable outcome; none asserts a duration."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from cgroups import daemon_in_memory_cgroup
from conftest import start_daemon, wait_until
from users import (
    OUTSIDER,
    as_user,
    ensure_user,
    shared_dir,
    start_as,
    unique,
    user_env,
)

from tensord.client import Client
from tensord.contract.descriptors import RequestDescriptor, TensorRef, encode_descriptor
from tensord.contract.errors import (
    BadInputError,
    ModelFailedError,
    ResourceError,
    TooLargeError,
)
from tensord.contract.frames import encode_frame, read_frame, read_frame_with_fds
from tensord.contract.layout import HEADER_SIZE, KIND_REQUEST, RECORD_HEADER_SIZE
from tensord.contract.messages import (
    PROTOCOL_VERSION as V,
)
from tensord.contract.messages import (
    Attached,
    Error,
    Hello,
    Ping,
    Pong,
    Ready,
    Welcome,
)
from tensord.transport import records
from tensord.transport.segment import EFD_REQ_DATA, Segment

HERE = Path(__file__).resolve().parent


# -- helpers: a client done by hand, so a test can misbehave at any step ------------------------

def connect(path: str, timeout: float = 30) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    end = time.monotonic() + timeout
    while True:
        try:
            s.connect(path)  # with a timeout set: EAGAIN while the listen queue is full
            return s
        except BlockingIOError:
            if time.monotonic() > end:
                s.close()
                raise
            time.sleep(0.01)


def hello(path: str, ring: int = 65536, name: str = "raw") -> tuple[socket.socket, object, list]:
    """Connect and send hello; returns the socket, the first reply and its descriptors."""
    s = connect(path)
    s.sendall(encode_frame(Hello(V, V, name, ring, ring)))
    msg, fds = read_frame_with_fds(s)
    return s, msg, fds


def handshake(path: str, ring: int = 65536, keep_fd: bool = False):
    """A whole handshake; returns (socket, segment, a duplicate of the segment's memfd or
    None). The duplicate is what a client that keeps the segment after its session holds."""
    s, w, fds = hello(path, ring)
    assert isinstance(w, Welcome), w
    kept = os.dup(fds[0]) if keep_fd else None
    seg = Segment.attach(fds, w.segment_size, w.request_ring, w.response_ring)
    s.sendall(encode_frame(Attached()))
    assert isinstance(read_frame(s), Ready)
    return s, seg, kept


def expect_fatal(s: socket.socket, name: str) -> Error:
    msg = read_frame(s)
    assert isinstance(msg, Error), msg
    assert msg.name == name and msg.fatal, msg
    assert s.recv(1) == b"", "the daemon must close the connection after a fatal error"
    return msg


def raw_request(c: Client, desc: bytes, record_len: int = 256):
    """Write a request record with an arbitrary descriptor through a client's ring."""
    ring = c.seg.requests
    off = ring.try_reserve(record_len)
    rid = 7_000_000 + record_len
    records.write(c.seg, off, KIND_REQUEST, rid, record_len, desc, [])
    ring.publish()
    c._req_data.notify()
    return c._await(rid, time.monotonic() + 30)


def proc_status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def context_switches(pid: int) -> int:
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
    return total


_said: dict[socket.socket, Error | None] = {}


def readable_errors(socks: list[socket.socket]) -> list[Error | None]:
    """For each socket: the error frame the daemon sent (it closes after it), or None when the
    daemon has said nothing yet. A frame is read once and remembered."""
    out: list[Error | None] = []
    for s in socks:
        if _said.get(s) is None:
            s.setblocking(False)
            try:
                head = s.recv(4, socket.MSG_PEEK)
            except OSError:
                head = b""
            if head:
                s.setblocking(True)
                s.settimeout(10)
                _said[s] = read_frame(s)
        out.append(_said.get(s))
    return out


def set_nproc(user: str, pid: int, soft) -> None:
    """Set a process's soft RLIMIT_NPROC, as its own user (this kernel refuses root changing
    another uid's limits; lowering or raising the soft limit under the hard one needs none)."""
    if soft == "hard":
        with open(f"/proc/{pid}/limits") as f:
            soft = next(ln.split()[3] for ln in f if ln.startswith("Max processes"))
    subprocess.run(as_user(user, ["prlimit", "--pid", str(pid), f"--nproc={soft}:"]),
                   check=True)


def save_mlp(path: Path) -> dict:
    """The built-in MLP as a TorchScript file, and the config table that loads it."""
    from tensord.models.builtin import build_mlp

    build_mlp().save(str(path))
    path.chmod(0o644)
    return {"source": "torchscript", "path": str(path), "device": "cpu",
            "inputs": [{"name": "x", "dtype": "f32", "shape": [-1, 16]}],
            "outputs": [{"name": "y", "dtype": "f32", "shape": [-1, 4]}]}


# == 2. /dev/shm is not the daemon's: strangers' files there cannot stop it ===================

def test_the_daemon_serves_with_dev_shm_read_only_and_full_of_strangers_files(go_probe):
    """Protocol 3 and later keep nothing in /dev/shm (sessions are memfds), so nothing a
    stranger plants there, nor /dev/shm being unusable, can stop the daemon. Its /dev/shm is
    made read-only and holds files of another user named as protocol 2 named its segments
    and semaphores; it starts, serves Python and Go clients, and stops cleanly."""
    daemon_user = ensure_user(unique("tdplant"))
    outsider = ensure_user(OUTSIDER)
    names = [f"tensord-{3999999}-" + "ab" * 16, f"sem.tensord-{3999999}-" + "ab" * 16 + "-rd",
             "tensord-" + "00" * 16]
    # in the daemon's own mount namespace only: the machine's /dev/shm is not touched
    mounts = ("mount -t tmpfs -o mode=1777 tmpfs /dev/shm",
              *(f"echo x > /dev/shm/{n} && chown {outsider.pw_uid} /dev/shm/{n} && "
                f"chmod 600 /dev/shm/{n}" for n in names),
              "mount -o remount,ro /dev/shm")
    d = shared_dir("tensord-plant-")
    daemon = None
    try:
        probe = d / "shmprobe"
        shutil.copy(go_probe, probe)
        probe.chmod(0o755)
        for _ in range(2):  # and a restart finds it the same
            daemon = start_as(daemon_user.pw_name, d, "[daemon]\nsocket_mode = 0o666\n",
                              mounts=mounts)
            g = torch.Generator().manual_seed(3)
            with Client(daemon.path) as c:
                for i in range(20):
                    x = torch.randn(1 + i, 16, generator=g)
                    assert torch.equal(c.infer("identity", {"x": x})["y"], x)
                    assert c.infer("mlp", {"x": x})["y"].shape == (1 + i, 4)
            go = subprocess.run([str(probe), "-mode", "roundtrip", "-n", "20", "-bytes", "4096"],
                                capture_output=True, text=True, timeout=300,
                                env={**os.environ, "TENSORD_SOCKET": daemon.path})
            assert go.returncode == 0 and go.stdout.strip() == "ok 20", go.stderr
            assert "Traceback" not in daemon.logs(), daemon.logs()
            assert daemon.stop() == 0, daemon.logs()
            daemon = None
    finally:
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(d)


def test_a_dead_socket_planted_at_the_path_fails_start_up_with_a_reason():
    """In a world-writable sticky directory (the /tmp fallback) a stranger's file at the socket
    path cannot be removed: the daemon says so and exits; it does not crash."""
    daemon_user = ensure_user(unique("tdplant"))
    ensure_user(OUTSIDER)
    d = shared_dir("tensord-squat-")
    try:
        d.chmod(0o1777)
        sock = d / "tensord.sock"
        subprocess.run(as_user(OUTSIDER, [sys.executable, "-c",
                       f"import socket; socket.socket(socket.AF_UNIX).bind({str(sock)!r})"]),
                       check=True, env=user_env(d / "home"))
        argv = as_user(daemon_user.pw_name, [sys.executable, "-m", "tensord", "serve",
                                             "--socket", str(sock)])
        r = subprocess.run(argv, capture_output=True, text=True, env=user_env(d / "home"),
                           timeout=300)
        assert r.returncode == 1, r.stderr
        assert "Traceback" not in r.stderr, r.stderr
        assert str(sock) in r.stderr and "--socket" in r.stderr, r.stderr
        assert sock.exists()
    finally:
        shutil.rmtree(d)


# == 3. connection floods, thread and descriptor exhaustion =====================================

def test_pending_connections_are_bounded_and_the_longest_waiting_are_refused(tmp_path):
    d = start_daemon(tmp_path, config="[daemon]\nmax_pending = 8\n")
    silent = []
    try:
        for _ in range(40):
            silent.append(connect(d.path))
        # a real client behind them is served at once, not after their handshake deadline
        with Client(d.path) as c:
            assert torch.equal(c.infer("identity", {"x": torch.ones(3)})["y"], torch.ones(3))
        wait_until(lambda: sum(e is not None for e in readable_errors(silent[:32])) == 32,
                   "the oldest silent connections to be refused")
        errs = readable_errors(silent)
        refused = [e for e in errs if e is not None and e.name == "RESOURCE"]
        assert all(e.fatal and "max_pending" in e.message for e in refused), refused
        # at most max_pending wait at once: every silent one beyond that was refused
        assert len(refused) >= len(silent) - 8, errs
        assert d.proc.poll() is None
    finally:
        for s in silent:
            s.close()
        assert d.stop() == 0, d.logs()


def test_low_fd_limit_a_client_is_served_while_silent_connections_hold_descriptors(tmp_path):
    d = start_daemon(tmp_path)
    silent = []
    try:
        with Client(d.path) as c:  # the daemon's own descriptors settle after a first session
            c.ping()
        wait_until(lambda: len(d.open_fds()) < 200, "the first session's descriptors")
        limit = len(d.open_fds()) + 12
        resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (limit, limit))
        for _ in range(100):
            silent.append(connect(d.path))
        with Client(d.path) as c:  # needs a socket, a memfd and four eventfds
            assert torch.equal(c.infer("identity", {"x": torch.arange(7)})["y"],
                               torch.arange(7))
        errs = [e for e in readable_errors(silent) if e is not None]
        # The client got in because silent connections were refused, not because their
        # handshake deadline freed their descriptors.
        assert errs and all(e.name == "RESOURCE" for e in errs), errs
        assert not any("did not complete" in e.message for e in errs)
        assert d.proc.poll() is None
    finally:
        for s in silent:
            s.close()
        assert d.stop() == 0, d.logs()


def test_task_limit_silent_connections_and_admin_loads_do_not_kill_the_daemon():
    """RLIMIT_NPROC (what systemd's TasksMax does to a unit) reached: 200 silent connections
    and a load that needs a thread; the daemon answers RESOURCE and goes on."""
    user = ensure_user(unique("tdnproc"))
    d = shared_dir("tensord-nproc-")
    daemon = None
    silent = []
    try:
        table = save_mlp(d / "mlp.pt")
        daemon = start_as(user.pw_name, d, "[daemon]\nsocket_mode = 0o666\nadmin_uids = [0]\n")
        with Client(daemon.path) as c:
            # start the compute thread and its OpenMP pool before the limit is reached
            c.infer("mlp", {"x": torch.ones(4096, 16)})
        tasks = len(os.listdir(f"/proc/{daemon.pid}/task"))
        set_nproc(user.pw_name, daemon.pid, tasks)
        for _ in range(200):
            silent.append(connect(daemon.path))
        with Client(daemon.path) as c:
            x = torch.randn(3, 16)
            assert c.infer("mlp", {"x": x})["y"].shape == (3, 4)
            assert torch.equal(c.infer("identity", {"x": x})["y"], x)
            with pytest.raises(ResourceError, match="thread"):
                c.load("mlp2", table)
            c.ping()  # the session goes on
            set_nproc(user.pw_name, daemon.pid, "hard")
            c.load("mlp2", table)
            assert c.infer("mlp2", {"x": x})["y"].shape == (3, 4)
        assert daemon.proc.poll() is None, daemon.logs()
        assert "Traceback" not in daemon.logs(), daemon.logs()
    finally:
        for s in silent:
            s.close()
        if daemon is not None:
            assert daemon.stop() == 0, daemon.logs()
        shutil.rmtree(d)


# == 4. PAD flood ==============================================================================

def test_pads_count_toward_the_per_pass_record_cap():
    """The ring core walks at most `limit` records per poll, PADs included."""
    from tensord.contract.layout import KIND_PAD, REQ_CONTROL, write_header
    from tensord.transport.ring import RingConsumer, RingControl, Shm

    cap = 1 << 20
    buf = mmap.mmap(-1, HEADER_SIZE + 2 * cap)
    write_header(memoryview(buf), cap, cap)
    pads = np.frombuffer(buf, dtype=np.uint32, count=cap // 4, offset=HEADER_SIZE)
    pads = pads.reshape(-1, 16)
    pads[:, 0] = 64
    pads[:, 1] = KIND_PAD
    del pads
    shm = Shm(buf)
    ctl = RingControl(shm, REQ_CONTROL)
    ctl.set_tail(cap)
    consumer = RingConsumer(ctl, HEADER_SIZE, cap, KIND_REQUEST)
    for i in range(1, 4):
        assert consumer.poll(16) == []
        assert consumer.read == i * 16 * 64
        assert ctl.head() == consumer.read  # PADs are released at once
        assert consumer.core.held == 0
    shm.close()
    buf.close()


def test_pad_flood_is_served_in_bounded_slices_and_costs_no_memory(tmp_path):
    d = start_daemon(tmp_path)
    cap = 64 << 20
    s, seg, _ = handshake(d.path, cap)
    done = threading.Event()
    seen_heads: list[int] = []
    results = {"ok": 0, "bad": 0}

    def other_client():
        g = torch.Generator().manual_seed(12)
        with Client(d.path) as c:
            while not done.is_set():
                x = torch.randint(-2**31, 2**31 - 1, (64,), generator=g, dtype=torch.int32)
                ok = torch.equal(c.infer("identity", {"x": x}, timeout=60)["y"], x)
                results["ok" if ok else "bad"] += 1
                seen_heads.append(seg.req_ctl.head())

    try:
        with Client(d.path) as c:  # settle the daemon's memory before measuring
            for _ in range(50):
                c.infer("identity", {"x": torch.ones(64)})
        anon_before = proc_status(d.pid, "RssAnon")
        t = threading.Thread(target=other_client)
        t.start()
        wait_until(lambda: results["ok"] >= 5, "the other client to run")
        ring = seg.header.request_ring_offset
        pads = np.frombuffer(seg.buf, dtype=np.uint32, count=cap // 4, offset=ring)
        pads = pads.reshape(-1, 16)
        pads[:, 0] = 64  # a million 64-byte PADs, published with one 8-byte tail store
        pads[:, 1] = 0
        del pads
        seg.req_ctl.set_tail(cap)
        seg.shm.post(seg.efds[EFD_REQ_DATA])
        wait_until(lambda: seg.req_ctl.head() == cap, "the daemon to walk every PAD", 600)
        done.set()
        t.join()
        anon_after = proc_status(d.pid, "RssAnon")
        assert results["bad"] == 0 and results["ok"] > 5
        # The other client's requests completed while the flood was being walked: it was
        # consumed in slices between them, not in one go.
        during = {h for h in seen_heads if 0 < h < cap}
        assert len(during) >= 2, f"{len(during)} completions during the flood"
        assert anon_after - anon_before < 32 * 1024, (anon_before, anon_after)  # KiB
        s.sendall(encode_frame(Ping(1)))
        assert read_frame(s) == Pong(1)  # the flooding session itself is fine
    finally:
        done.set()
        s.close()
        seg.close()
        assert d.stop() == 0, d.logs()


# == 5. wake-up flood ==========================================================================

FLOODER = r"""
import os, signal, socket, sys
from tensord.contract.frames import encode_frame, read_frame, read_frame_with_fds
from tensord.contract.messages import PROTOCOL_VERSION as V, Attached, Hello

stop = []
signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(encode_frame(Hello(V, V, "flooder", 65536, 65536)))
w, fds = read_frame_with_fds(s)
s.sendall(encode_frame(Attached()))
read_frame(s)
rd = fds[1]
print("flooding", flush=True)
n = 0
while not stop:
    try:
        os.eventfd_write(rd, 1)
    except BlockingIOError:
        pass
    n += 1
print("stopped", n, flush=True)
sys.stdin.read()  # keep the session until the test is done
"""


def test_wakeup_flood_costs_the_flooder_not_the_others(tmp_path):
    d = start_daemon(tmp_path)
    script = tmp_path / "flooder.py"
    script.write_text(FLOODER)
    flooder = subprocess.Popen([sys.executable, str(script), d.path], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert flooder.stdout.readline().strip() == "flooding"
        g = torch.Generator().manual_seed(5)
        with Client(d.path) as c:
            for i in range(300):
                x = torch.randn(1 + i % 50, generator=g)
                assert torch.equal(c.infer("identity", {"x": x}, timeout=120)["y"], x)
                assert c.infer("mlp", {"x": torch.ones(2, 16)}, timeout=120)["y"].shape == (2, 4)
        flooder.send_signal(signal.SIGUSR1)
        line = flooder.stdout.readline().split()
        assert line[0] == "stopped" and int(line[1]) > 1000, line
        # The flooder still holds its session, but posts nothing: the daemon has nothing
        # left to do for it (counter-mode eventfds coalesce; nothing queued per post).
        time.sleep(0.5)
        before = context_switches(d.pid)
        time.sleep(2.0)
        woke = context_switches(d.pid) - before
        assert woke < 100, f"the daemon woke {woke} times in 2 s after the flood stopped"
    finally:
        flooder.kill()
        flooder.wait()
        assert d.stop() == 0, d.logs()


# == 6. memory accounting ======================================================================

RING = 1 << 20
SEGMENT = HEADER_SIZE + 2 * RING


def _concurrent_hellos(path: str, n: int) -> list:
    barrier = threading.Barrier(n)
    out: list = [None] * n

    def one(i):
        s = connect(path)
        barrier.wait()
        s.sendall(encode_frame(Hello(V, V, f"c{i}", RING, RING)))
        msg, fds = read_frame_with_fds(s)
        out[i] = (s, msg, fds)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_concurrent_handshakes_cannot_overrun_the_memory_budget(tmp_path):
    d = start_daemon(tmp_path, config=f"[daemon]\nmax_memory = {5 * SEGMENT + 4096}\n"
                                         # one uid here: the budget in all is under test
                                         "max_memory_per_uid = 0\n")
    try:
        for _ in range(3):  # the same, round after round: nothing leaks from the accounting
            got = _concurrent_hellos(d.path, 8)
            welcomed = [g for g in got if isinstance(g[1], Welcome)]
            refused = [g[1] for g in got if isinstance(g[1], Error)]
            assert len(welcomed) == 5 and len(refused) == 3, [g[1] for g in got]
            assert all(e.name == "RESOURCE" and "max_memory" in e.message for e in refused)
            for s, _, fds in got:
                for fd in fds:
                    os.close(fd)
                s.close()
            wait_until(lambda: len(d.open_fds()) < 40, "the sessions to close")
            with Client(d.path, request_ring=RING, response_ring=RING) as c:
                c.ping()
            wait_until(lambda: len(d.open_fds()) < 40, "the session to close")
    finally:
        assert d.stop() == 0, d.logs()


PER_UID_CLIENT = r"""
import json, sys
from tensord.client import Client
from tensord.contract.errors import ResourceError
path, ring = sys.argv[1], int(sys.argv[2])
out = []
clients = []
for _ in range(2):
    try:
        clients.append(Client(path, request_ring=ring, response_ring=ring))
        out.append("ok")
    except ResourceError as e:
        out.append(str(e))
print(json.dumps(out))
"""


def test_per_uid_session_and_memory_quotas():
    user = ensure_user(unique("tdquota"))
    d = shared_dir("tensord-quota-")
    big = 4 << 20
    try:
        daemon = start_daemon(d, config=f"""[daemon]
socket_mode = 0o666
max_sessions_per_uid = 2
max_memory_per_uid = {HEADER_SIZE + 3 * big}
""")
        try:
            small = {"request_ring": 65536, "response_ring": 65536}
            a = Client(daemon.path, **small)
            b = Client(daemon.path, **small)
            with pytest.raises(ResourceError, match="max_sessions_per_uid=2"):
                Client(daemon.path, **small)
            # another uid is not held back by root's sessions; its own quota of memory is
            # what stops its second big session
            (d / "client.py").write_text(PER_UID_CLIENT)
            r = subprocess.run(as_user(user.pw_name, [sys.executable, str(d / "client.py"),
                                                      daemon.path, str(big)]),
                               capture_output=True, text=True, env=user_env(d / "home"),
                               timeout=300)
            assert r.returncode == 0, r.stderr
            first, second = json.loads(r.stdout)
            assert first == "ok"
            assert "max_memory_per_uid" in second and f"uid {user.pw_uid}" in second, second
            a.ping()
            b.close()
            wait_until(lambda: _can_connect(daemon.path), "root's slot to be free again")
            a.close()
        finally:
            assert daemon.stop() == 0, daemon.logs()
    finally:
        shutil.rmtree(d)


def _can_connect(path: str) -> bool:
    try:
        Client(path, request_ring=65536, response_ring=65536).close()
        return True
    except ResourceError:
        return False


def test_available_memory_reads_cgroup_v1_and_v2_limits(tmp_path):
    from tensord.transport.segment import available_memory

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 1000000 kB\nMemAvailable: 500000 kB\n")
    # v1: the memory controller's own hierarchy; a parent's tighter limit counts too
    v1 = tmp_path / "v1"
    leaf = v1 / "memory" / "a" / "b"
    leaf.mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text("1000\n")
    (v1 / "memory" / "a" / "memory.limit_in_bytes").write_text(f"{300 << 20}\n")
    (v1 / "memory" / "a" / "memory.usage_in_bytes").write_text(f"{100 << 20}\n")
    (leaf / "memory.limit_in_bytes").write_text(f"{400 << 20}\n")
    (leaf / "memory.usage_in_bytes").write_text(f"{50 << 20}\n")
    cg = tmp_path / "cgroup-v1"
    cg.write_text("9:name=systemd:/\n4:memory:/a/b\n0::/\n")
    free, why = available_memory(proc_cgroup=str(cg), cgroup_root=str(v1),
                                 meminfo=str(meminfo))
    assert (free, why) == (200 << 20, "the daemon's cgroup memory limit")
    # v2: memory.max / memory.current, ancestors included
    v2 = tmp_path / "v2"
    (v2 / "x" / "y").mkdir(parents=True)
    (v2 / "x" / "memory.max").write_text(f"{100 << 20}\n")
    (v2 / "x" / "memory.current").write_text(f"{60 << 20}\n")
    (v2 / "x" / "y" / "memory.max").write_text("max\n")
    (v2 / "x" / "y" / "memory.current").write_text(f"{10 << 20}\n")
    cg.write_text("0::/x/y\n")
    free, why = available_memory(proc_cgroup=str(cg), cgroup_root=str(v2),
                                 meminfo=str(meminfo))
    assert (free, why) == (40 << 20, "the daemon's cgroup memory limit")
    # no limit anywhere: the host's available memory
    cg.write_text("0::/\n")
    assert available_memory(proc_cgroup=str(cg), cgroup_root=str(tmp_path / "none"),
                            meminfo=str(meminfo)) == (500000 * 1024,
                                                      "the host's available memory")


def test_a_cgroup_v1_memory_limit_refuses_the_session_that_does_not_fit(tmp_path):
    with daemon_in_memory_cgroup(tmp_path) as (d, cg):
        big = 64 << 20
        usage = int((cg / "memory.usage_in_bytes").read_text())
        (cg / "memory.limit_in_bytes").write_text(str(usage + 3 * big))
        with Client(d.path, request_ring=big // 2, response_ring=big // 2) as c:
            c.ping()
            s, msg, fds = hello(d.path, 2 * big)
            assert isinstance(msg, Error) and msg.name == "RESOURCE", msg
            assert "cgroup" in msg.message and "MiB" in msg.message, msg.message
            s.close()
            c.ping()


def _allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def _identity_raw(s: socket.socket, seg: Segment, payload: bytes, rid: int):
    """One identity request through a hand-made session; returns the response record, read
    but not released."""
    desc = encode_descriptor(RequestDescriptor("identity", 0, [TensorRef(
        "x", "u8", [len(payload)], 0, len(payload))]))
    start = (RECORD_HEADER_SIZE + len(desc) + 16 + 63) & ~63
    desc = encode_descriptor(RequestDescriptor("identity", 0, [TensorRef(
        "x", "u8", [len(payload)], start, len(payload))]))
    n = (start + len(payload) + 63) & ~63
    off = seg.requests.try_reserve(n)
    seg.shm.write_record(off, KIND_REQUEST, rid, n, desc)
    seg.buf[off + start:off + start + len(payload)] = payload
    seg.requests.publish()
    seg.shm.post(seg.efds[EFD_REQ_DATA])
    got: list = []
    wait_until(lambda: got.extend(seg.responses.poll()) or got, "the response")
    (rec,) = got
    assert rec.request_id == rid
    return rec


def test_ended_sessions_return_their_memory_even_if_the_client_keeps_the_segment(tmp_path):
    d = start_daemon(tmp_path, config="[daemon]\nmax_sessions = 8\n")
    ring = 4 << 20
    kept: list[int] = []
    try:
        for i in range(12):  # more than max_sessions, each keeping its segment's memfd
            s, seg, fd = handshake(d.path, ring, keep_fd=True)
            kept.append(fd)
            assert _allocated(fd) >= 2 * ring  # reserved up front (posix_fallocate)
            payload = os.urandom(1 << 20)
            rec = _identity_raw(s, seg, payload, i + 1)
            if i < 11:
                seg.responses.release(rec)
                s.close()
                seg.close()
                wait_until(lambda fd=fd: _allocated(fd) <= 2 * 4096,
                           "the daemon to punch the ended session's pages out")
            else:
                # A response the client has not released stays intact after the session
                # ends (views stay readable until released); everything else goes.
                before = bytes(seg.buf[rec.offset:rec.offset + rec.record_len])
                s.close()
                limit = 4096 + rec.record_len + 2 * 4096
                wait_until(lambda fd=fd, lim=limit: _allocated(fd) <= lim, "the rest to be punched")
                assert bytes(seg.buf[rec.offset:rec.offset + rec.record_len]) == before
                seg.responses.release(rec)
                seg.close()
        assert sum(_allocated(fd) for fd in kept) < 2 * ring
    finally:
        for fd in kept:
            os.close(fd)
        assert d.stop() == 0, d.logs()


def test_a_requests_input_bytes_are_limited_per_model(tmp_path):
    table = save_mlp(tmp_path / "mlp.pt")
    d = start_daemon(tmp_path, config=f"""
[[models]]
name = "small"
source = "torchscript"
path = "{table['path']}"
max_input_bytes = 65536
inputs = [{{name = "x", dtype = "f32", shape = [-1, 16]}}]
outputs = [{{name = "y", dtype = "f32", shape = [-1, 4]}}]
""")
    try:
        with Client(d.path, request_ring=8 << 20, response_ring=8 << 20) as c:
            with pytest.raises(TooLargeError, match="max_input_bytes"):
                c.infer("small", {"x": torch.ones(4096, 16)})  # 256 KiB
            assert c.infer("small", {"x": torch.ones(16, 16)})["y"].shape == (16, 4)
    finally:
        assert d.stop() == 0, d.logs()



# == 7. per-client errors: BAD_INPUT, and logged one line each, rate-limited ===================

def test_zero_element_tensor_with_huge_dimensions_is_bad_input(tmp_path):
    d = start_daemon(tmp_path)
    try:
        with Client(d.path) as c:
            for shape in ([0, 2**40, 2**40], [2**30, 0, 2**30], [0] + [2**16] * 15):
                desc = encode_descriptor(RequestDescriptor("identity", 0, [
                    TensorRef("x", "f32", shape, 128, 0)]))
                for _ in range(20):
                    with pytest.raises(BadInputError, match="impossibly large"):
                        raw_request(c, desc)
            assert torch.equal(c.infer("identity", {"x": torch.ones(2)})["y"], torch.ones(2))
        log = d.logs()
        assert "Traceback" not in log and "Stride" not in log, log[-3000:]
    finally:
        assert d.stop() == 0, d.logs()


def test_per_client_errors_are_logged_rate_limited_one_line_each(tmp_path):
    d = start_daemon(tmp_path, config="""
[[models]]
name = "doubler"
source = "handler"
handler = "handlers_for_tests:Doubler"
""")
    try:
        with Client(d.path) as c:
            for _ in range(300):
                with pytest.raises(ModelFailedError):
                    c.infer("doubler", {"x": torch.full((4,), 1e7)})
            c.ping()
        lines = [ln for ln in d.logs().splitlines() if "overflow in the model" in ln]
        assert 1 <= len(lines) <= 20, f"{len(lines)} log lines for 300 failed requests"
        assert "Traceback" not in d.logs()
    finally:
        assert d.stop() == 0, d.logs()



# == 8. inputs that must be refused ============================================================

@pytest.mark.parametrize("rings", [(-65536, 0), (0, -1), (-(2**63), 0)])
def test_negative_ring_sizes_are_refused(daemon, rings):
    s = connect(daemon.path)
    s.sendall(encode_frame(Hello(V, V, "negative", *rings)))
    err = expect_fatal(s, "BAD_MESSAGE")
    assert "ring" in err.message and "negative" in err.message


def test_negative_and_zero_message_ids_are_refused_and_the_connection_lives(daemon):
    s, seg, _ = handshake(daemon.path)
    try:
        for rid in (-5, 0, -(2**63)):
            s.sendall(struct.pack("<I", len(b := msgpack.packb({"type": "ping", "id": rid})))
                      + b)
            err = read_frame(s)
            assert isinstance(err, Error) and err.name == "BAD_MESSAGE" and not err.fatal
            assert err.id == 0 and "id" in err.message
        for m in ({"type": "models", "id": -1}, {"type": "unload", "id": -2, "name": "mlp"}):
            b = msgpack.packb(m)
            s.sendall(struct.pack("<I", len(b)) + b)
            err = read_frame(s)
            assert isinstance(err, Error) and err.name == "BAD_MESSAGE" and not err.fatal
        s.sendall(encode_frame(Ping(2**64 - 1)))
        assert read_frame(s) == Pong(2**64 - 1)
        with Client(daemon.path) as c:
            assert c.infer("mlp", {"x": torch.ones(1, 16)})["y"].shape == (1, 4)
    finally:
        s.close()
        seg.close()


# == 9. admin loads are code execution: allow_handlers and model_dirs ==========================

ADMIN_CLIENT = r"""
import json, sys
from tensord.client import Client
path, cases = sys.argv[1], json.loads(sys.argv[2])
out = []
with Client(path) as c:
    for name, table in cases:
        try:
            c.load(name, table)
            out.append("ok")
        except Exception as e:
            out.append(f"{type(e).__name__}: {e}")
print(json.dumps(out))
"""


def test_admin_loads_are_limited_to_allowed_handlers_and_model_dirs():
    admin = ensure_user(unique("tdadmin"))
    d = shared_dir("tensord-admin-")
    models = d / "models"
    models.mkdir()
    try:
        mlp = save_mlp(models / "mlp.pt")
        outside = save_mlp(d / "outside.pt")
        (models / "escape.pt").symlink_to(d / "outside.pt")
        daemon = start_daemon(d, config=f"""[daemon]
socket_mode = 0o666
admin_uids = [0, {admin.pw_uid}]
model_dirs = ["{models}"]

[[models]]
name = "doubler"
source = "handler"
handler = "handlers_for_tests:Doubler"
""")
        try:
            sig = {k: mlp[k] for k in ("inputs", "outputs")}
            cases = [
                ["gate", {"source": "handler", "handler": "handlers_for_tests:Gate",
                          "options": {"dir": str(d)}, "warmup": False}],
                ["evil", {"source": "handler", "handler": "os:system", **sig}],
                ["doubler2", {"source": "handler", "handler": "handlers_for_tests:Doubler"}],
                ["outside", outside],
                ["escape", {**mlp, "path": str(models / "escape.pt")}],
                ["dotdot", {**mlp, "path": str(models / ".." / "outside.pt")}],
                ["inside", mlp],
            ]
            (d / "admin.py").write_text(ADMIN_CLIENT)
            r = subprocess.run(as_user(admin.pw_name, [sys.executable, str(d / "admin.py"),
                                                       daemon.path, json.dumps(cases)]),
                               capture_output=True, text=True, env=user_env(d / "home"),
                               timeout=300)
            assert r.returncode == 0, r.stderr
            got = dict(zip([n for n, _ in cases], json.loads(r.stdout)))
            for name in ("gate", "evil"):
                assert got[name].startswith("PermissionDeniedError") and \
                    "allow_handlers" in got[name], got[name]
            for name in ("outside", "escape", "dotdot"):
                assert got[name].startswith("PermissionDeniedError") and \
                    "model_dirs" in got[name], got[name]
            assert got["doubler2"] == "ok" and got["inside"] == "ok", got
            # root (and the daemon's own user) already can do anything a load does
            with Client(daemon.path) as c:
                c.load("gate", cases[0][1])
                assert {"gate", "doubler2", "inside"} <= {m.name for m in c.models()}
        finally:
            assert daemon.stop() == 0, daemon.logs()
    finally:
        shutil.rmtree(d)


def test_allow_handlers_patterns():
    from tensord.control.admin import handler_allowed

    allowed = ["pkg.models:Embedder", "other.handlers:*"]
    assert handler_allowed("pkg.models:Embedder", allowed)
    assert handler_allowed("other.handlers:Anything", allowed)
    assert not handler_allowed("pkg.models:Other", allowed)
    assert not handler_allowed("other.handlers.sub:X", allowed)
    assert not handler_allowed("pkg.models:Embedder2", allowed)
    assert handler_allowed("x:Y", ["*"])
    assert not handler_allowed("x:Y", [])
