"""tensord as users install it, not as the checkout runs it: `pip wheel .` builds a wheel with
the native core; installed into a fresh virtual environment (no checkout on the path) it
serves a Go client; and its client and operator commands run in an environment without
torch (numpy and msgpack only)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import start_daemon, stop_process

from tensord.models.builtin import build_mlp

ROOT = Path(__file__).resolve().parent.parent


def _source_copy(dst: Path) -> Path:
    """The checkout's files (tracked, and new ones git does not ignore) copied to `dst`, so
    the build writes its build/ and egg-info there, not into the checkout."""
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       cwd=ROOT, capture_output=True, check=True)
    for name in filter(None, r.stdout.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    return dst


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel .`, as a user runs it (build isolation: whatever setup.py and
    [build-system] need is fetched by pip)."""
    if shutil.which("git") is None:
        pytest.skip("git is needed to copy the checkout for the build")
    src = _source_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("wheelhouse")
    env = dict(os.environ)
    if (ROOT / "daemon" / "native" / "target").is_dir():
        # the checkout's cargo cache (daemon/setup.sh built the crate there): the copy's
        # crate builds against the dependencies compiled already, not from scratch
        env["CARGO_TARGET_DIR"] = str(ROOT / "daemon" / "native" / "target")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                        "--wheel-dir", str(out), str(src)], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = out.glob("tensord-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    # the native core and the package data are in it, and nothing but the package
    assert any(n.startswith("tensord/") and n.endswith(".so") for n in names), names
    assert "tensord/examples/imagenet_classes.txt" in names
    top = {n.split("/")[0] for n in names if not n.startswith("tensord-")}
    assert top == {"tensord"}, sorted(n for n in names if not n.startswith("tensord"))
    return whl


def _venv(path: Path) -> Path:
    """A fresh virtual environment (no pip in it: this interpreter's pip installs into it)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    return path / "bin" / "python"


def _pip_into(python: Path, *args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                        "--quiet", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path("
                          "'purelib'))"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def _clean_env(**extra: str) -> dict[str, str]:
    """No PYTHONPATH (the tests' own points into the checkout), no venv of the test run."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(extra)
    return env


def test_the_wheel_installed_in_a_fresh_venv_serves_a_go_client(wheel, tmp_path, go_probe):
    py = _venv(tmp_path / "venv")
    _pip_into(py, "--no-deps", str(wheel))
    # Its dependencies (torch is several GB) come from this run's environment through a .pth
    # line: a directory on the path, whose own .pth files (the checkout's editable install)
    # are not processed, so `tensord` can only come from the wheel.
    (_site_packages(py) / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    where = subprocess.run(
        [str(py), "-c", "import json, sys, tensord, tensord._core as r; "
                        "print(json.dumps([tensord.__file__, r.__file__, sys.path]))"],
        capture_output=True, text=True, cwd=tmp_path, env=_clean_env())
    assert where.returncode == 0, where.stderr
    pkg, native, path = json.loads(where.stdout)
    venv = str(tmp_path / "venv")
    assert pkg.startswith(venv) and native.startswith(venv), (pkg, native)
    # nothing else on its path holds a tensord package (the checkout's is daemon/tensord)
    others = [p for p in path if p and (Path(p) / "tensord").exists()
              and not p.startswith(venv)]
    assert others == [], others
    assert str(ROOT / "daemon") not in path and str(ROOT) not in path, path

    sock = tmp_path / "tensord.sock"
    log = tmp_path / "daemon.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([str(tmp_path / "venv" / "bin" / "tensord"), "serve", "--socket",
                                 str(sock)], stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path,
                                env=_clean_env())
    try:
        end = time.monotonic() + 120
        while not sock.exists():  # the daemon binds its socket once its models are loaded
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < end, log.read_text()
            time.sleep(0.05)
        go = subprocess.run([go_probe, "-socket", str(sock), "-mode", "roundtrip", "-n", "30",
                             "-bytes", "65536", "-timeout", "180s"],
                            capture_output=True, text=True, timeout=300)
        assert go.returncode == 0 and go.stdout.strip() == "ok 30", go.stderr + log.read_text()
    finally:
        rc = stop_process(proc, 15, timeout=20)
    assert rc == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()


CLIENT = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    import numpy as np
    from tensord.client import ByteStrings, Client
    imported = time.perf_counter() - t0
    sock, want = sys.argv[1], json.load(open(sys.argv[2]))
    rng = np.random.default_rng(7)
    with Client(sock) as c:
        names = sorted(m.name for m in c.models())
        for dtype in ("float32", "float64", "int8", "int64", "uint8", "bool", "float16"):
            x = (rng.random((3, 5)) * 100).astype(dtype)
            y = c.infer("identity", {"x": x})["y"]
            assert isinstance(y, np.ndarray) and y.dtype == x.dtype, (dtype, type(y))
            assert y.shape == x.shape and y.tobytes() == x.tobytes(), dtype
        y = c.infer("mlp", {"x": np.asarray(want["x"], dtype=np.float32)})["y"]
        assert np.allclose(y, np.asarray(want["y"], dtype=np.float32), rtol=1e-5, atol=1e-5)
        b = c.infer("identity", {"x": ByteStrings([b"a", b"", b"xyz"], (3,))})["y"]
        assert b.items == [b"a", b"", b"xyz"], b
    print(json.dumps({"models": names, "torch": "torch" in sys.modules,
                      "import_s": imported}))
""")


def test_the_client_and_operator_commands_run_without_torch(wheel, tmp_path):
    """A venv with the wheel and its declared dependencies only (pip resolves them: numpy
    and msgpack, no torch) calls a real daemon from Python and runs every operator command;
    `tensord serve` there says what is missing."""
    py = _venv(tmp_path / "venv")
    _pip_into(py, str(wheel))  # with its dependencies, as a user installs it
    listed = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "list",
                             "--format=json"], capture_output=True, text=True, check=True)
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"tensord", "numpy", "msgpack"} <= installed and "torch" not in installed, installed

    d = start_daemon(tmp_path)
    try:
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(11))
        with torch.no_grad():
            y = build_mlp()(x)
        (tmp_path / "want.json").write_text(json.dumps({"x": x.tolist(), "y": y.tolist()}))
        (tmp_path / "client.py").write_text(CLIENT)
        r = subprocess.run([str(py), str(tmp_path / "client.py"), d.path,
                            str(tmp_path / "want.json")], capture_output=True, text=True,
                           cwd=tmp_path, env=_clean_env(), timeout=300)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert got["torch"] is False and {"identity", "mlp"} <= set(got["models"]), got
        print(f"import tensord.client without torch: {got['import_s'] * 1e3:.0f} ms")

        tensord = str(tmp_path / "venv" / "bin" / "tensord")
        outs = {}
        for cmd in ("ping", "health", "status", "stats", "models"):
            r = subprocess.run([tensord, cmd, "--socket", d.path], capture_output=True,
                               text=True, cwd=tmp_path, env=_clean_env(), timeout=120)
            assert r.returncode == 0 and "Traceback" not in r.stderr, (cmd, r.stderr)
            outs[cmd] = r.stdout
        assert "answered in" in outs["ping"] and outs["health"].strip() == "ready"
        assert "mlp" in outs["status"] and "mlp" in outs["stats"]
        assert any(line.startswith("mlp v") for line in outs["models"].splitlines()), outs
    finally:
        assert d.stop() == 0, d.logs()

    r = subprocess.run([str(tmp_path / "venv" / "bin" / "tensord"), "serve", "--socket",
                        str(tmp_path / "never.sock")], capture_output=True, text=True,
                       cwd=tmp_path, env=_clean_env(), timeout=120)
    assert r.returncode == 1 and "pip install 'tensord[serve]'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([str(tmp_path / "venv" / "bin" / "tensord"), "export", "m:f", "-o",
                        str(tmp_path / "m.pt")], capture_output=True, text=True, cwd=tmp_path,
                       env=_clean_env(), timeout=120)
    assert r.returncode == 1 and "`tensord export` needs torch" in r.stderr, r.stderr
    assert "pip install 'tensord[serve]'" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_numpy_in_numpy_out_torch_in_torch_out(daemon):
    """The client returns what it was given: numpy arrays for numpy inputs, torch tensors
    for torch inputs (in one process that has both)."""
    from tensord.client import Client

    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    with Client(daemon.path) as c:
        y = c.infer("identity", {"x": a})["y"]
        assert isinstance(y, np.ndarray) and y.dtype == np.int32 and np.array_equal(y, a)
        t = torch.arange(6, dtype=torch.bfloat16)
        y = c.infer("identity", {"x": t})["y"]
        assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16 and torch.equal(y, t)
        with pytest.raises(TypeError, match="numpy arrays, torch tensors or ByteStrings"):
            c.infer("identity", {"x": [1, 2, 3]})

