"""Memory cgroups for tests that run the daemon under a memory limit (cgroup v1's memory
controller, as root): the daemon's own cgroup, and a child of it removed afterwards."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def own_memcg() -> Path | None:
    """This process's v1 memory cgroup when it is writable here; None otherwise."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
                if (base / "memory.limit_in_bytes").exists() and os.access(base, os.W_OK):
                    return base
    return None


SKIP_REASON = ("no writable cgroup v1 memory controller on this machine (needs root with a "
               "writable /sys/fs/cgroup/memory)")


@contextlib.contextmanager
def memory_cgroup(parent: Path) -> Iterator[Path]:
    """A child memory cgroup of `parent`, removed afterwards (pass or fail): whatever still
    runs in it (only what the test started) moves back to the parent first."""
    cg = parent / f"tensord-test-{os.getpid()}"
    cg.mkdir()
    try:
        yield cg
    finally:
        for pid in (cg / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):  # it may have exited meanwhile
                (parent / "cgroup.procs").write_text(pid)
        cg.rmdir()


@contextlib.contextmanager
def daemon_in_memory_cgroup(tmp_path: Path, config: str | None = None) -> Iterator[tuple]:
    """A daemon started inside a fresh child memory cgroup (no limit yet: the test sets one
    from the usage it sees), stopped afterwards and checked to exit 0; skips where there is
    no writable memory controller."""
    import pytest
    from conftest import start_daemon

    parent = own_memcg()
    if parent is None:
        pytest.skip(SKIP_REASON)
    d = None
    rc = 0
    with memory_cgroup(parent) as cg:
        procs = cg / "cgroup.procs"
        try:
            d = start_daemon(tmp_path, config=config,
                             preexec_fn=lambda: procs.write_text(str(os.getpid())))
            yield d, cg
        finally:
            if d is not None:
                rc = d.stop()
    assert rc == 0, d.logs() if d else ""
