"""Misbehaving clients, a dying daemon, and bad input: clear errors, nothing lost or leaked."""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import torch
from conftest import shm_entries, start_daemon
from handlers_for_tests import wait_for

from tensord.client import Client
from tensord.contract.descriptors import RequestDescriptor, TensorRef, encode_descriptor
from tensord.contract.dtypes import ByteStrings
from tensord.contract.errors import (
    BadInputError,
    BadRequestError,
    ConnectionClosedError,
    DeadlineError,
    ModelFailedError,
    ResourceError,
    TooLargeError,
    UnknownModelError,
)
from tensord.contract.frames import encode_frame, read_frame, read_frame_with_fds
from tensord.contract.layout import KIND_REQUEST, REQ_CONTROL
from tensord.contract.messages import PROTOCOL_VERSION as V
from tensord.contract.messages import (
    SUPPORTED_VERSIONS,
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


def raw_frame(body: bytes) -> bytes:
    return struct.pack("<I", len(body)) + body


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    return s


def handshake(path: str) -> tuple[socket.socket, Segment]:
    """A client done by hand, so tests can break the protocol at any step."""
    s = connect(path)
    s.sendall(encode_frame(Hello(V, V, "raw", 65536, 65536)))
    w, fds = read_frame_with_fds(s)
    assert isinstance(w, Welcome)
    seg = Segment.attach(fds, w.segment_size, w.request_ring, w.response_ring)
    s.sendall(encode_frame(Attached()))
    assert isinstance(read_frame(s), Ready)
    return s, seg


def expect_fatal(s: socket.socket, name: str) -> Error:
    msg = read_frame(s)
    assert isinstance(msg, Error), msg
    assert msg.name == name and msg.fatal, msg
    assert s.recv(1) == b"", "the daemon must close the connection after a fatal error"
    return msg


def send_raw_request(c: Client, desc: bytes, payload: bytes = b"", payload_at: int = 128):
    """Write a request record with arbitrary descriptor bytes through the client's ring."""
    n = records.plan([len(payload)], lambda offs: desc)[0]
    n = max(n, (payload_at + len(payload) + 63) & ~63)
    ring = c.seg.requests
    off = ring.try_reserve(n)
    rid = 1_000_000 + n
    records.write(c.seg, off, KIND_REQUEST, rid, n, desc, [])
    c.seg.buf[off + payload_at:off + payload_at + len(payload)] = payload
    ring.publish()
    c._req_data.notify()
    return c._await(rid, time.monotonic() + 10)


# -- control channel ------------------------------------------------------------------------

def test_frame_length_over_limit_is_fatal_and_others_keep_working(daemon):
    with Client(daemon.path) as other:
        s = connect(daemon.path)
        s.sendall(struct.pack("<I", 0xFFFFFFFF))
        err = expect_fatal(s, "BAD_FRAME")
        assert "outside" in err.message
        assert torch.equal(other.infer("identity", {"x": torch.ones(3)})["y"], torch.ones(3))


@pytest.mark.parametrize("body", [b"\xc1", b"\x93\x01\x02\x03", b"\x81\x01\x02",
                                  msgpack.packb({"type": "hello"}) + b"\x00"])
def test_malformed_body_is_fatal(daemon, body):
    s = connect(daemon.path)
    s.sendall(raw_frame(body))
    expect_fatal(s, "BAD_FRAME")


def test_handshake_has_one_deadline_however_slowly_bytes_arrive(daemon):
    s = connect(daemon.path)
    s.settimeout(30)
    hello = encode_frame(Hello(V, V, "trickle", 0, 0))
    t0 = time.monotonic()
    for b in hello:  # one byte every 2 s: each recv is quick, the whole is not
        s.send(bytes([b]))
        readable, _, _ = select.select([s], [], [], 2)
        if readable:  # the daemon gave up on us; stop before it sees unread bytes
            break
    err = expect_fatal(s, "BAD_MESSAGE")
    assert "did not complete within" in err.message
    assert time.monotonic() - t0 < 25


def test_first_message_must_be_hello(daemon):
    s = connect(daemon.path)
    s.sendall(encode_frame(Ping(1)))
    expect_fatal(s, "BAD_MESSAGE")


def test_version_mismatch_is_fatal_and_says_which(daemon):
    s = connect(daemon.path)
    s.sendall(encode_frame(Hello(7, 9, "future", 0, 0)))
    err = expect_fatal(s, "VERSION")
    assert "7..9" in err.message and f"{list(SUPPORTED_VERSIONS)}" in err.message


def test_older_version_client_is_refused_naming_both_versions(daemon):
    old = min(SUPPORTED_VERSIONS) - 1  # version 4 is still spoken (SPEC §2.4 hello)
    s = connect(daemon.path)
    s.sendall(encode_frame(Hello(old, old, "old", 0, 0)))
    err = expect_fatal(s, "VERSION")
    assert f"{old}..{old}" in err.message and f"{list(SUPPORTED_VERSIONS)}" in err.message \
        and "upgrade" in err.message


def test_client_gone_during_handshake_leaves_nothing(daemon):
    before = daemon.open_fds()
    s = connect(daemon.path)
    s.sendall(encode_frame(Hello(V, V, "quitter", 0, 0)))
    w, fds = read_frame_with_fds(s)
    assert isinstance(w, Welcome) and len(fds) == 5
    for fd in fds:
        os.close(fd)
    assert daemon.shm_entries() == [], "nothing of a session has a name"
    s.close()
    deadline = time.monotonic() + 5
    while len(daemon.open_fds()) > len(before) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(daemon.open_fds()) <= len(before), "the daemon closed the session's descriptors"


def test_client_cannot_resize_its_segment(daemon):
    s = connect(daemon.path)
    s.sendall(encode_frame(Hello(V, V, "resizer", 65536, 65536)))
    w, (fd, *efds) = read_frame_with_fds(s)
    for e in efds:
        os.close(e)
    try:
        # A shrink would make the daemon's next access of the ring a SIGBUS; the seals refuse.
        for size in (0, w.segment_size // 2, w.segment_size * 2):
            with pytest.raises(PermissionError):
                os.ftruncate(fd, size)
        assert os.fstat(fd).st_size == w.segment_size
    finally:
        os.close(fd)
        s.close()
    with Client(daemon.path) as c:
        c.ping()


def test_bad_message_after_handshake_is_answered_and_connection_lives(daemon):
    s, seg = handshake(daemon.path)
    assert daemon.shm_entries() == [], "names are unlinked once the client attached"
    s.sendall(raw_frame(msgpack.packb({"type": "bogus", "id": 5})))
    err = read_frame(s)
    assert isinstance(err, Error) and err.name == "BAD_MESSAGE" and err.id == 5
    assert not err.fatal
    s.sendall(raw_frame(msgpack.packb({"type": "ping", "id": "seven"})))
    err = read_frame(s)
    assert isinstance(err, Error) and err.name == "BAD_MESSAGE" and "id" in err.message
    s.sendall(encode_frame(Ping(6)))
    assert read_frame(s) == Pong(6)
    s.close()
    seg.close()


def test_failed_admin_message_is_answered_and_connection_lives(daemon):
    s, seg = handshake(daemon.path)
    s.sendall(raw_frame(msgpack.packb({"type": "unload", "id": 3, "name": "nope"})))
    err = read_frame(s)
    assert isinstance(err, Error) and err.id == 3 and not err.fatal
    assert err.name == "UNKNOWN_MODEL"
    s.sendall(encode_frame(Ping(4)))
    assert read_frame(s) == Pong(4)
    s.close()
    seg.close()


# -- ring records -------------------------------------------------------------------------

def test_corrupt_ring_tail_is_fatal_bad_record_and_others_keep_working(daemon):
    with Client(daemon.path) as other:
        s, seg = handshake(daemon.path)
        struct.pack_into("<Q", seg.buf, REQ_CONTROL, 12345)  # not a multiple of 64
        seg.shm.post(seg.efds[EFD_REQ_DATA])  # wake the daemon's dispatcher
        err = expect_fatal(s, "BAD_RECORD")
        assert "tail" in err.message
        seg.close()
        assert torch.equal(other.infer("identity", {"x": torch.ones(2)})["y"], torch.ones(2))


def test_bad_descriptors_get_an_error_response_and_the_session_goes_on(daemon):
    with Client(daemon.path) as c:
        with pytest.raises(BadRequestError, match="not valid msgpack"):
            send_raw_request(c, b"\xc1")
        with pytest.raises(BadRequestError, match="missing field 'inputs'"):
            send_raw_request(c, msgpack.packb({"model": "identity", "timeout_us": 0}))
        # the tensor claims bytes beyond its record
        d = encode_descriptor(RequestDescriptor("identity", 0, [TensorRef("x", "f32", [1 << 20],
                                                                          128, 4 << 20)]))
        with pytest.raises(BadInputError, match="outside the record"):
            send_raw_request(c, d)
        # nbytes that does not match the shape
        d = encode_descriptor(RequestDescriptor("identity", 0, [TensorRef("x", "f32", [4], 128,
                                                                          12)]))
        with pytest.raises(BadInputError, match="needs 16 bytes"):
            send_raw_request(c, d, bytes(12))
        # an unknown dtype
        d = encode_descriptor(RequestDescriptor("identity", 0, [TensorRef("x", "c64", [1], 128,
                                                                          8)]))
        with pytest.raises(BadInputError, match="unknown dtype 'c64'"):
            send_raw_request(c, d, bytes(8))
        # a bool byte that is neither 0 nor 1
        d = encode_descriptor(RequestDescriptor("identity", 0, [TensorRef("x", "bool", [2], 128,
                                                                          2)]))
        with pytest.raises(BadInputError, match="bool"):
            send_raw_request(c, d, b"\x01\x07")
        # a bytes tensor whose lengths overrun its nbytes
        d = encode_descriptor(RequestDescriptor("identity", 0, [TensorRef("x", "bytes", [1], 128,
                                                                          8)]))
        with pytest.raises(BadInputError, match="lengths add up"):
            send_raw_request(c, d, struct.pack("<I", 1000) + b"abcd")
        # a tensor that overlaps the descriptor
        d = encode_descriptor(RequestDescriptor("identity", 0, [TensorRef("x", "u8", [4], 0, 4)]))
        with pytest.raises(BadInputError, match="outside the record's data area"):
            send_raw_request(c, d)
        assert torch.equal(c.infer("identity", {"x": torch.ones(2)})["y"], torch.ones(2))


def test_unknown_model_wrong_dtype_wrong_shape(daemon):
    with Client(daemon.path) as c:
        with pytest.raises(UnknownModelError, match="'resnet'.*identity"):
            c.infer("resnet", {"x": torch.ones(1)})
        with pytest.raises(BadInputError, match="dtype f64, the model takes f32"):
            c.infer("mlp", {"x": torch.ones(2, 16, dtype=torch.float64)})
        with pytest.raises(BadInputError, match=r"shape \[2, 15\]"):
            c.infer("mlp", {"x": torch.ones(2, 15)})
        with pytest.raises(BadInputError, match="takes inputs"):
            c.infer("mlp", {"input": torch.ones(2, 16)})
        with pytest.raises(BadInputError, match="dtype bytes, the model takes f32"):
            c.infer("mlp", {"x": ByteStrings([b"a"], (1,))})
        assert c.infer("mlp", {"x": torch.ones(2, 16)})["y"].shape == (2, 4)


def test_tensor_larger_than_the_ring(daemon):
    with Client(daemon.path, request_ring=65536, response_ring=65536) as c:
        with pytest.raises(TooLargeError, match="request ring holds 65536"):
            c.infer("identity", {"x": torch.ones(100_000)})
    # the request fits, the response does not: the daemon says which size to ask for
    with Client(daemon.path, request_ring=1 << 20, response_ring=65536) as c:
        with pytest.raises(TooLargeError, match="at least 262144 bytes"):
            c.infer("identity", {"x": torch.ones(50_000)})
        assert torch.equal(c.infer("identity", {"x": torch.ones(5)})["y"], torch.ones(5))


def test_ring_above_max_ring_and_too_many_sessions(tmp_path):
    # (a /dev/shm too small for the rings is tested on Segment.create in test_ring.py)
    d = start_daemon(tmp_path, config="[daemon]\nmax_ring = 1048576\ndefault_ring = 65536\n"
                                      "max_sessions = 1\n")
    try:
        with pytest.raises(TooLargeError, match="at most 1048576"):
            Client(d.path, request_ring=1 << 21)
        with Client(d.path) as c:
            with pytest.raises(ResourceError, match="max_sessions=1"):
                Client(d.path)
            c.ping()
        assert d.shm_entries() == []
        # the slot is free again once the daemon has seen the first client's EOF
        deadline = time.monotonic() + 10
        while True:
            try:
                with Client(d.path) as c:
                    c.ping()
                break
            except ResourceError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        assert d.stop() == 0


def test_impossible_shapes_are_bad_input(daemon):
    with Client(daemon.path) as c:
        for shape in ([0, 2**64 - 1], [0, 2**62, 4]):
            d = encode_descriptor(RequestDescriptor("identity", 0, [TensorRef("x", "f32", shape,
                                                                              128, 0)]))
            with pytest.raises(BadInputError, match="impossibly large"):
                send_raw_request(c, d)
        c.ping()


def test_socket_path_that_is_a_regular_file_is_left_alone(tmp_path):
    victim = tmp_path / "tensord.sock"
    victim.write_text("precious")
    with pytest.raises(RuntimeError, match="is not a socket"):
        start_daemon(tmp_path)
    assert victim.read_text() == "precious"


def test_running_out_of_file_descriptors_does_not_kill_the_daemon(tmp_path):
    import resource

    d = start_daemon(tmp_path, preexec_fn=lambda: resource.setrlimit(
        resource.RLIMIT_NOFILE, (64, 64)))
    try:
        socks = []
        for _ in range(100):
            s = socket.socket(socket.AF_UNIX)
            s.connect(d.path)  # the kernel queues these even while accept() fails
            socks.append(s)
        deadline = time.monotonic() + 20
        while "Too many open files" not in d.logs():  # the daemon has hit the limit
            assert time.monotonic() < deadline, d.logs()
            time.sleep(0.05)
        assert d.proc.poll() is None, d.logs()
        for s in socks:
            s.close()
        deadline = time.monotonic() + 20
        while True:
            try:
                with Client(d.path) as c:
                    c.ping()
                break
            except (ConnectionClosedError, ResourceError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert "Too many open files" in d.logs()
    finally:
        assert d.stop() == 0


def test_client_that_never_reads_cannot_block_shutdown(tmp_path):
    d = start_daemon(tmp_path)
    s, seg = handshake(d.path)
    s.setblocking(False)
    sent = 0
    try:
        for i in range(200_000):  # pings whose pongs are never read fill both socket buffers
            s.send(encode_frame(Ping(i + 1)))
            sent += 1
    except BlockingIOError:
        pass
    assert sent > 100
    time.sleep(0.5)
    t0 = time.monotonic()
    assert d.stop() == 0, d.logs()
    assert time.monotonic() - t0 < 30, "shutdown waited on a client that does not read"
    s.close()
    seg.close()


# -- crashes --------------------------------------------------------------------------------

SLOW = """
import torch
class Slow(torch.nn.Module):
    def forward(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        w = torch.ones(256, 256) / 256.0
        y = x
        for _ in range(int(n.item())):
            y = torch.tanh(y @ w)
        return y
torch.jit.script(Slow()).save({path!r})
"""


@pytest.fixture
def slow_daemon(tmp_path):
    path = str(tmp_path / "slow.pt")
    script = tmp_path / "make_slow.py"  # TorchScript reads the class's source from a file
    script.write_text(SLOW.format(path=path))
    subprocess.run([sys.executable, str(script)], check=True)
    d = start_daemon(tmp_path, config=f"""
[[models]]
name = "slow"
source = "torchscript"
path = "{path}"
inputs = [{{name = "x", dtype = "f32", shape = [-1, 256]}}, {{name = "n", dtype = "i64"}}]
outputs = [{{name = "y", dtype = "f32", shape = [-1, 256]}}]

[[models]]
name = "gate"
source = "handler"
handler = "handlers_for_tests:Gate"
warmup = false
options = {{dir = "{tmp_path}"}}
""")
    d.gate = tmp_path
    yield d
    d.stop()


def test_deadline_is_checked_when_the_model_would_run(slow_daemon):
    d = slow_daemon
    with Client(d.path) as a, Client(d.path) as b:
        busy = threading.Thread(target=a.infer, args=("gate", {"x": torch.ones(1)}),
                                kwargs={"timeout": 120})
        busy.start()
        wait_for(d.gate / "started")  # the gate model's worker is held at the gate
        late = {}

        def call_b():
            try:
                b.infer("gate", {"x": torch.ones(1)}, timeout=60,
                        budget=0.2)
            except Exception as e:  # recorded for the assertion below
                late["err"] = e

        t = threading.Thread(target=call_b)
        t.start()
        # b's request waits in the queue behind the gate; its 0.2 s budget is long gone
        # after 2 s (a lower bound, so no timing can make this flaky), then the gate opens.
        time.sleep(2.0)
        (d.gate / "open").touch()
        busy.join()
        t.join()
        assert isinstance(late.get("err"), DeadlineError), late
        assert "time budget ran out" in str(late["err"])
        assert b.infer("slow", {"x": torch.ones(1, 256), "n": torch.tensor(1)},
                       timeout=30)["y"].shape == (1, 256)


def test_a_slow_model_does_not_hold_up_another(slow_daemon):
    """Each model has its own worker: while the gate holds one forward pass, another model
    serves."""
    d = slow_daemon
    with Client(d.path) as a, Client(d.path) as b:
        busy = threading.Thread(target=a.infer, args=("gate", {"x": torch.ones(1)}),
                                kwargs={"timeout": 120})
        busy.start()
        wait_for(d.gate / "started")
        for _ in range(5):
            assert b.infer("slow", {"x": torch.ones(1, 256), "n": torch.tensor(1)},
                           timeout=60)["y"].shape == (1, 256)
        assert busy.is_alive(), "the gate still holds its request"
        (d.gate / "open").touch()
        busy.join()


def test_model_raising_is_a_model_failed_error(slow_daemon):
    with Client(slow_daemon.path) as c:
        with pytest.raises(ModelFailedError, match="'slow' failed on this request"):
            c.infer("slow", {"x": torch.ones(2, 256), "n": torch.tensor([1, 2])})
        y = c.infer("slow", {"x": torch.ones(2, 256), "n": torch.tensor(3)})["y"]
        assert y.shape == (2, 256)


PY_CLIENT = """
import sys, torch
from tensord.client import Client
c = Client(sys.argv[1])
print("sent", flush=True)
c.infer("gate", {"x": torch.ones(4)})
"""


def test_client_sigkilled_mid_request_leaves_nothing(slow_daemon, go_probe, tmp_path):
    d = slow_daemon
    script = tmp_path / "client.py"
    script.write_text(PY_CLIENT)
    victims = [
        # Go: a published request whose response is never read
        ([go_probe, "-socket", d.path, "-mode", "hang", "-model", "slow"], "sent"),
        # Go: killed while streaming 1 MiB requests through identity
        ([go_probe, "-socket", d.path, "-mode", "roundtrip", "-n", "100000",
          "-bytes", str(1 << 20)], None),
    ]
    # Python: killed while the daemon is computing its request (held at the gate)
    victims.append(([sys.executable, str(script), d.path], "gate"))
    with Client(d.path) as other:
        for cmd, ready in victims:
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            if ready == "gate":
                wait_for(d.gate / "started")
            elif ready:
                assert p.stdout.readline().strip() == ready
            else:
                time.sleep(0.7)  # let it stream for a while (no bound is checked on this)
            assert p.poll() is None, f"{cmd[0]} ended before it could be killed"
            p.send_signal(signal.SIGKILL)
            p.wait()
            (d.gate / "open").touch()
            x = torch.randn(4, 256)
            assert other.infer("slow", {"x": x, "n": torch.tensor(1)})["y"].shape == (4, 256)
    deadline = time.monotonic() + 10
    while d.shm_entries() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.shm_entries() == []
    assert "Traceback" not in d.logs()


def test_daemon_killed_client_fails_promptly_and_nothing_stays(slow_daemon):
    d = slow_daemon
    c = Client(d.path)
    c.ping()
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    t0 = time.monotonic()
    with pytest.raises(ConnectionClosedError, match="closed the connection"):
        c.infer("slow", {"x": torch.ones(1, 256), "n": torch.tensor(1)})
    assert time.monotonic() - t0 < 30  # the point is that it returns at all, not how fast
    c.close()
    assert shm_entries(d.pid) == []


def test_daemon_killed_while_request_in_flight(slow_daemon):
    d = slow_daemon
    c = Client(d.path)
    result = {}

    def call():
        try:
            c.infer("gate", {"x": torch.ones(1)})
        except Exception as e:  # recorded for the assertion below
            result["err"] = e

    t = threading.Thread(target=call)
    t.start()
    wait_for(d.gate / "started")
    d.proc.send_signal(signal.SIGKILL)
    t.join(timeout=30)
    assert not t.is_alive(), "the call must not hang when the daemon dies"
    assert isinstance(result.get("err"), ConnectionClosedError)
    c.close()
    assert shm_entries(d.pid) == []
