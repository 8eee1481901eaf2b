"""Memory a client keeps after its session (issue 19.3): a client that never reads its
responses and keeps its copy of the memfd after closing kept +248 MiB of shmem per session
while admission counted 0 and let new sessions in. The daemon punches everything but the
unreleased responses (the client may still read those) and now counts those against the
uid until the client releases them or exits. Measured as the memfd's allocated blocks and
the daemon's RssShmem."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import start_daemon, wait_until

from tensord.client import Client
from tensord.contract.errors import ResourceError
from tensord.probe import ControlClient

MiB = 1 << 20
RING = 16 * MiB
RESPONSES = 12  # 1 MiB identity responses left unread in the response ring
LIMIT = 40 * MiB  # per uid: one 32 MiB session fits, not with 12 MiB held besides

HOSTILE = r"""
import os, sys, time
from tensord.contract.descriptors import RequestDescriptor, TensorRef, encode_descriptor
from tensord.contract.frames import encode_frame, read_frame, read_frame_with_fds
from tensord.contract.layout import KIND_REQUEST, RECORD_HEADER_SIZE
from tensord.contract.messages import PROTOCOL_VERSION as V, Attached, Hello, Ready
from tensord.transport.segment import EFD_REQ_DATA, Segment
import socket

path, ring, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_UNIX)
s.connect(path)
s.sendall(encode_frame(Hello(V, V, "never reads", ring, ring)))
w, fds = read_frame_with_fds(s)
kept = os.dup(fds[0])  # the copy of the memfd it keeps after the session
seg = Segment.attach(fds, w.segment_size, w.request_ring, w.response_ring)
s.sendall(encode_frame(Attached()))
assert isinstance(read_frame(s), Ready)
payload = bytes(range(256)) * 4096  # 1 MiB
start = 128
desc = encode_descriptor(RequestDescriptor("identity", 0, [TensorRef(
    "x", "u8", [len(payload)], start, len(payload))]))
assert RECORD_HEADER_SIZE + len(desc) <= start
size = (start + len(payload) + 63) & ~63
for rid in range(1, n + 1):
    while (off := seg.requests.try_reserve(size)) is None:
        time.sleep(0.001)
    seg.shm.write_record(off, KIND_REQUEST, rid, size, desc)
    seg.buf[off + start:off + start + len(payload)] = payload
    seg.requests.publish()
    seg.shm.post(seg.efds[EFD_REQ_DATA])
resp = seg.resp_ctl
end = time.monotonic() + 120
while resp.tail() - resp.head() < n * len(payload):  # every response written, none read
    assert time.monotonic() < end, "the daemon did not answer"
    time.sleep(0.01)
s.close()  # the session ends; the mapping and the descriptor stay
print("ready", kept, flush=True)
for line in sys.stdin:
    if line.strip() == "release":  # what a client does as it releases its views
        resp.set_head(resp.tail())
        print("released", flush=True)
"""


def allocated(pid: int, fd: int) -> int:
    """Bytes of pages the memfd holds (st_blocks), seen through the client's descriptor."""
    return os.stat(f"/proc/{pid}/fd/{fd}").st_blocks * 512


def shmem_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("RssShmem:"))


def start_hostile(tmp_path, d) -> tuple[subprocess.Popen, int]:
    script = tmp_path / "hostile.py"
    script.write_text(HOSTILE)
    p = subprocess.Popen([sys.executable, str(script), d.path, str(RING), str(RESPONSES)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().split()
    assert line[:1] == ["ready"], line
    return p, int(line[1])


def refused_for_memory(d) -> bool:
    """Whether a 32 MiB session of this uid is refused now (the probe first: the control loop
    has handled every session end queued before it answers)."""
    with ControlClient(d.path) as c:
        c.ping()
    try:
        Client(d.path, request_ring=RING, response_ring=RING).close()
    except ResourceError as e:
        assert "max_memory_per_uid" in str(e), e
        return True
    return False


@pytest.mark.parametrize("ends_by", ["release", "exit"])
def test_unreleased_responses_stay_counted_until_released_or_the_client_exits(tmp_path,
                                                                            ends_by):
    d = start_daemon(tmp_path, config=f"[daemon]\nmax_memory_per_uid = {LIMIT}\n")
    p = None
    try:
        base = shmem_rss(d.pid)
        p, fd = start_hostile(tmp_path, d)
        # everything but the unread responses is punched at once
        wait_until(lambda: allocated(p.pid, fd) <= (RESPONSES + 1) * MiB,
                   "the ended session's other pages to be punched")
        held = allocated(p.pid, fd)
        assert held >= RESPONSES * MiB, "responses the client may still read are kept"
        print(f"after the session: {held / MiB:.1f} MiB of the memfd kept for the client")
        # ... and counted: this uid's next big session does not fit beside them
        assert refused_for_memory(d), "the kept responses are not counted against the uid"
        if ends_by == "release":
            p.stdin.write("release\n")
            p.stdin.flush()
            assert p.stdout.readline().strip() == "released"
            wait_until(lambda: allocated(p.pid, fd) <= 2 * 4096,
                       "the released responses to be punched")
        else:
            p.send_signal(signal.SIGKILL)
            p.wait()
            wait_until(lambda: shmem_rss(d.pid) <= base + MiB,
                       "the daemon to drop the exited client's pages")
        wait_until(lambda: not refused_for_memory(d), "the uid's memory to be free again")
    finally:
        if p is not None:
            p.kill()
            p.wait()
        assert d.stop() == 0, d.logs()
