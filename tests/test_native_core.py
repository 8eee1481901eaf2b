"""The native core's Python API (tensord._core): what the C ring core did and the daemon relies
on — errors and messages for bad offsets, a closed view, read-only or misaligned buffers — the
GIL released while waiting, and a stub that names what the module has."""

from __future__ import annotations

import mmap
import os
import re
import threading
import time
from pathlib import Path

import pytest

from tensord import _core
from tensord.contract.layout import HEADER_SIZE, KIND_REQUEST, REQ_CONTROL, write_header

CAP = 1 << 16


@pytest.fixture
def shm():
    mm = mmap.mmap(-1, HEADER_SIZE + 2 * CAP)
    write_header(memoryview(mm), CAP, CAP)
    s = _core.Shm(mm)
    yield s
    s.close()
    mm.close()


def test_offsets_outside_the_mapping_are_refused_with_the_c_cores_messages(shm):
    size = shm.size
    with pytest.raises(ValueError, match=rf"range \[{size}, {size + 8}\) lies outside the "
                                         rf"{size}-byte segment"):
        shm.load64(size)
    with pytest.raises(ValueError, match=r"range \[-8, 0\) lies outside"):
        shm.store64(-8, 1)
    with pytest.raises(ValueError, match="offset 4 is not 8-byte aligned"):
        shm.load64(4)
    with pytest.raises(ValueError, match="a 64-byte record cannot hold a 41-byte descriptor"):
        shm.write_record(HEADER_SIZE, KIND_REQUEST, 1, 64, b"x" * 41)
    with pytest.raises(ValueError, match="ring capacity 100 is not a power of two >= 64"):
        _core.Consumer(shm, REQ_CONTROL, HEADER_SIZE, 100, KIND_REQUEST)
    with pytest.raises(TypeError, match="expected a Shm"):
        _core.Producer(object(), REQ_CONTROL, HEADER_SIZE, CAP)
    with pytest.raises(TypeError):
        _core.spin_any([], 0)  # a tuple, as the C core required
    p = _core.Producer(shm, REQ_CONTROL, HEADER_SIZE, CAP)
    with pytest.raises(ValueError, match="record length 100 is not a multiple of 64"):
        p.reserve(100)
    c = _core.Consumer(shm, REQ_CONTROL, HEADER_SIZE, CAP, KIND_REQUEST)
    with pytest.raises(KeyError, match="record at 64 is not held"):
        c.release(64)
    for fd in (-1, 2**31):
        with pytest.raises(ValueError, match=f"{fd} is not a file descriptor"):
            shm.post(fd)


def test_bytes_round_trip_through_the_mapping(shm):
    payload = bytes(range(256)) * 300  # > 64 KiB: copied without the GIL
    shm.copy_in(HEADER_SIZE, payload)
    assert shm.copy_out(HEADER_SIZE, len(payload)) == payload
    shm.write_record(HEADER_SIZE, KIND_REQUEST, 2**64 - 1, 128, b"desc")
    assert shm.read_header(HEADER_SIZE) == (128, KIND_REQUEST, 2**64 - 1, 4)


def test_a_closed_view_raises_and_touches_nothing(shm):
    c = _core.Consumer(shm, REQ_CONTROL, HEADER_SIZE, CAP, KIND_REQUEST)
    shm.close()
    shm.close()  # idempotent
    assert shm.closed
    for call in (lambda: shm.load64(0), lambda: c.poll(1), c.published,
                 lambda: shm.copy_out(0, 1)):
        with pytest.raises(ValueError, match="closed"):
            call()


def test_buffers_must_be_writable_and_aligned():
    with pytest.raises(BufferError):
        _core.Shm(b"\0" * 128)
    mm = mmap.mmap(-1, 4096)
    try:
        with pytest.raises(ValueError, match="64-byte aligned"):
            _core.Shm(memoryview(mm)[8:])
    finally:
        mm.close()


def test_wait_releases_the_gil(shm):
    """A thread blocked in Shm.wait must not stop Python threads: this one counts while the
    other waits 300 ms for a counter that never moves."""
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        t = threading.Thread(target=shm.wait, args=(REQ_CONTROL, 0, REQ_CONTROL + 72, efd, 0,
                                                    300_000_000))
        t.start()
        time.sleep(0.02)
        n, end = 0, time.monotonic() + 0.1
        while time.monotonic() < end:
            n += 1
        assert t.is_alive() and n > 1000
        t.join()
    finally:
        os.close(efd)


def test_the_stub_names_what_the_module_has():
    stub = (Path(_core.__file__).parent / "_core.pyi").read_text()
    declared = set(re.findall(r"^(?:class|def) (\w+)", stub, re.M))
    assert declared == {n for n in dir(_core) if not n.startswith("_")}
    for cls in ("Shm", "Consumer", "Producer", "Signature"):
        body = stub.split(f"\nclass {cls}")[1].split("\nclass ")[0].split("\ndef ")[0]
        methods = set(re.findall(r"def (\w+)", body)) - {"__init__"}
        assert methods == {n for n in dir(getattr(_core, cls)) if not n.startswith("_")}, cls
