"""Correctness under back-pressure and failure (issue 15): every taken request gets its own
answer, with its own bytes, whatever the ring, the model or the other requests do. Each test
sends distinct payloads and checks the bytes."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import start_daemon
from pipelining import publish, responses

from tensord.client import ByteStrings, Client


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = start_daemon(tmp_path_factory.mktemp("correctness"))
    yield d
    assert d.stop() == 0, d.logs()


def test_parked_identity_responses_keep_their_own_bytes(daemon):
    """Defect 1: 12 pipelined 16 KiB identity requests through 64 KiB rings park most of their
    responses; each must come back filled with its own number, although the client reuses the
    request ring space as soon as the daemon releases it."""
    with Client(daemon.path, request_ring=65536, response_ring=65536) as c:
        ids = set()
        for i in range(12):
            publish(c, "identity", 100 + i, torch.full((4096,), float(i + 1)), "f32")
            ids.add(100 + i)
        time.sleep(0.2)  # let the daemon take (and release) every request before reading
        got = responses(c, ids)
        wrong = {rid - 100: float(out["y"][0]) for rid, out in got.items()
                 if not torch.equal(out["y"], torch.full((4096,), float(rid - 100 + 1)))}
        assert wrong == {}, f"responses filled with another request's bytes: {wrong}"


def test_parked_bytes_responses_keep_their_own_bytes(daemon):
    """The same for `bytes` tensors: distinct strings per request, checked one by one."""
    with Client(daemon.path, request_ring=65536, response_ring=65536) as c:
        ids = set()
        want = {}
        for i in range(12):
            items = [f"req{i}-item{k}-".encode() * 40 for k in range(30)]
            want[200 + i] = items
            publish(c, "identity", 200 + i, ByteStrings(items, (30,)), "bytes")
            ids.add(200 + i)
        time.sleep(0.2)
        got = responses(c, ids)
        for rid, out in got.items():
            assert list(out["y"].items) == want[rid], rid


def _uid_config(tmp_path, daemon: str = "", gate: str = "") -> str:
    return f"""
[daemon]
max_sessions = 128
{daemon}

[[models]]
name = "gate"
source = "handler"
handler = "handlers_for_tests:Gate"
warmup = false
options = {{dir = "{tmp_path}"}}
{gate}

[[models]]
name = "embed"
source = "handler"
handler = "handlers_for_tests:GatedEmbedding"
warmup = false
max_batch_size = 16
options = {{dir = "{tmp_path}"}}

[[models]]
name = "unwritable"
source = "handler"
handler = "handlers_for_tests:WriteFails"
warmup = false
"""


@pytest.fixture
def make_daemon(tmp_path):
    started = []

    def make(**keys):
        d = start_daemon(tmp_path, config=_uid_config(tmp_path, **keys))
        d.gate = tmp_path
        started.append(d)
        return d

    yield make
    for d in started:
        (d.gate / "open").touch()
        assert d.stop() == 0, d.logs()


def test_a_response_that_fails_to_write_is_answered_with_an_error(make_daemon):
    """Defect 2: a fault while copying outputs into the ring must not leave the request
    unanswered (it was a PAD and the client waited out its deadline): INTERNAL, ran."""
    from tensord.contract.errors import InternalError, safe_to_retry

    d = make_daemon()
    with Client(d.path) as c:
        t0 = time.monotonic()
        with pytest.raises(InternalError, match="could not be written") as e:
            c.infer("unwritable", {"x": torch.tensor([1.0, 2.0])}, timeout=30)
        assert time.monotonic() - t0 < 10, "answered at once, not at the deadline"
        assert not safe_to_retry(e.value), "the model ran: not safe to retry"
        assert "OSError" not in str(e.value), "Python exception names stay in the daemon log"
        # The session goes on.
        y = c.infer("identity", {"x": torch.tensor([5, 6, 7])}, timeout=30)["y"]
        assert y.tolist() == [5, 6, 7]


def test_one_bad_row_fails_only_its_own_request_in_a_batch(make_daemon):
    """Defect 3: torch's IndexError for one request's index must not fail the 8 good
    requests it was batched with; each good one gets its own row back."""
    from tensord.client import Client as C
    from tensord.contract.errors import ModelFailedError

    d = make_daemon()
    with C(d.path) as held_client, C(d.path) as c:
        import threading

        held = threading.Thread(target=held_client.infer,
                                args=("embed", {"x": torch.tensor([0])}), kwargs={"timeout": 60})
        held.start()
        from handlers_for_tests import gate_calls, wait_for

        wait_for(d.gate / "started")
        indices = {300 + k: k + 1 for k in range(8)}  # good: indices 1..8
        indices[399] = 99  # bad: out of the table's 10 rows
        for rid, idx in indices.items():
            publish(c, "embed", rid, torch.tensor([idx]), "i64")
        end = time.monotonic() + 30
        while {m.name: m for m in c.stats()}["embed"].queued != 9:
            assert time.monotonic() < end
            time.sleep(0.01)
        (d.gate / "open").touch()
        held.join()
        got = responses(c, set(indices))
        for rid, idx in indices.items():
            if idx == 99:
                assert isinstance(got[rid], ModelFailedError), got[rid]
                continue
            assert not isinstance(got[rid], Exception), (rid, got[rid])
            want = torch.tensor([[idx, idx + 0.25, idx + 0.5, idx + 0.75]])
            assert torch.equal(got[rid]["y"], want), (rid, got[rid]["y"])
        passes = gate_calls(d.gate)
        assert passes[1] == sorted(passes[1]) and len(passes[1]) == 9, passes
        # Bisection: the failed batch of 9 costs at most 2 * ceil(log2(9)) = 8 more passes.
        assert len(passes) - 2 <= 8, passes
        st = {m.name: m for m in c.stats()}["embed"]
        assert (st.served, st.failed) == (9, 1), st  # the held one and the 8 good ones


def _order_under_flood(d, flood_priority: int) -> list[float]:
    """Hold the gate, queue 20 flood requests (values 100+) at `flood_priority` and then 5
    normal ones from a light client (values 1-5); open the gate; the order they ran in."""
    from handlers_for_tests import gate_calls, wait_for

    with Client(d.path) as a, Client(d.path) as flood, Client(d.path) as light:
        import threading

        held = threading.Thread(target=a.infer, args=("gate", {"x": torch.tensor([0.0])}),
                                kwargs={"timeout": 60})
        held.start()
        wait_for(d.gate / "started")
        for i in range(20):
            publish(flood, "gate", 1000 + i, torch.tensor([100.0 + i]), "f32",
                    priority=flood_priority)
        for i in range(5):
            publish(light, "gate", 2000 + i, torch.tensor([1.0 + i]), "f32")
        end = time.monotonic() + 30
        while {m.name: m for m in a.stats()}["gate"].queued != 25:
            assert time.monotonic() < end
            time.sleep(0.01)
        (d.gate / "open").touch()
        held.join()
        got = responses(flood, {1000 + i for i in range(20)})
        assert all(float(got[1000 + i]["y"][0]) == 100.0 + i for i in range(20))
        got = responses(light, {2000 + i for i in range(5)})
        assert all(float(got[2000 + i]["y"][0]) == 1.0 + i for i in range(5))
    return [call[0] for call in gate_calls(d.gate)][1:]


def test_a_high_priority_flood_leaves_normal_requests_a_bounded_share(make_daemon):
    """Defect 4: 20 high-priority requests queued ahead of 5 normal ones: the normal ones
    still run at least every 4th (HIGH_RUN = 3), not after the whole flood."""
    import os

    d = make_daemon(daemon=f"priority_uids = [{os.getuid()}]")
    order = _order_under_flood(d, flood_priority=1)
    light = [order.index(1.0 + k) for k in range(5)]
    assert light == [3, 7, 11, 15, 19], order
    assert order[:3] == [100.0, 101.0, 102.0], "high priority still goes first"


def test_high_priority_is_only_heard_from_priority_uids(make_daemon):
    """Defect 4: a uid outside priority_uids asking for high priority is served at normal
    priority, so round-robin gives the light client every other turn."""
    d = make_daemon()  # no priority_uids: nobody gets high priority
    order = _order_under_flood(d, flood_priority=1)
    light = [order.index(1.0 + k) for k in range(5)]
    assert light == [1, 3, 5, 7, 9], order


def test_parked_responses_count_against_the_daemons_memory(tmp_path):
    """Defect 5: responses held for a client that does not read them count against
    max_memory; past it the request is answered TOO_LARGE (it ran) and nothing more is held.
    Every request is still answered, the good ones with their own bytes."""
    from tensord.contract.errors import TooLargeError, safe_to_retry

    seg = 4096 + (1 << 20) + 65536  # this client's segment
    # one uid here: the budget in all is under test, not the per-uid share of it
    d = start_daemon(tmp_path, config=f"[daemon]\nmax_memory = {seg + 512 * 1024}\n"
                     "max_memory_per_uid = 0\n")
    try:
        with Client(d.path, request_ring=1 << 20, response_ring=65536) as c:
            ids = set()
            for i in range(20):  # 60 KB each: one fits the response ring, ~8 more the budget
                publish(c, "identity", 500 + i, torch.full((15000,), float(i)), "f32")
                ids.add(500 + i)
            time.sleep(0.5)  # every request taken and answered before the client reads
            got = responses(c, ids)
        good = [rid for rid, v in got.items() if not isinstance(v, Exception)]
        for rid in good:
            assert torch.equal(got[rid]["y"], torch.full((15000,), float(rid - 500))), rid
        refused = [v for v in got.values() if isinstance(v, Exception)]
        assert 8 <= len(good) <= 10, (len(good), refused[:1])
        assert refused and all(isinstance(e, TooLargeError) and "max_memory" in str(e)
                               and not safe_to_retry(e) for e in refused), refused[:1]
    finally:
        assert d.stop() == 0, d.logs()


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_bytes_tensors_of_many_short_strings_do_not_multiply_in_memory(tmp_path):
    """Defect 5: 2.8 M two-byte strings (16 MiB on the wire) through identity cost the
    daemon a few copies of 16 MiB at most, not one Python object per string (~7x)."""
    d = start_daemon(tmp_path)
    try:
        n = 16 * (1 << 20) // 6
        items = [b"%02d" % (k % 100) for k in range(n)]
        x = ByteStrings(items, (n,))
        with Client(d.path, request_ring=64 << 20, response_ring=64 << 20) as c:
            c.infer("identity", {"x": ByteStrings([b"warm"], (1,))}, timeout=60)
            before = _peak_rss(d.pid)
            y = c.infer("identity", {"x": x}, timeout=120)["y"]
            grew = _peak_rss(d.pid) - before
        assert y.encode() == x.encode()
        assert grew < 4 * x.encoded_size(), f"peak RSS grew {grew >> 20} MiB for 16 MiB"
    finally:
        assert d.stop() == 0, d.logs()


def test_python_retry_safety_follows_spec_section_6():
    """Defect 6: the Python client's "ran?" per code is SPEC §6's column, read from SPEC."""
    import re
    from pathlib import Path

    from tensord.contract.errors import NOT_RUN, ErrorCode, error_from_code, safe_to_retry

    spec = (Path(__file__).resolve().parent.parent / "protocol" / "SPEC.md").read_text()
    rows = re.findall(r"(?m)^\|\s*(\d+)\s*\|\s*`([A-Z_]+)`\s*\|[^|]*\|\s*(no|may)\s*\|", spec)
    assert len(rows) == len(ErrorCode), rows
    for code, name, ran in rows:
        assert ErrorCode(int(code)).name == name
        assert (int(code) in NOT_RUN) == (ran == "no"), name
        assert safe_to_retry(error_from_code(int(code), "m")) == (ran == "no"), name


def test_python_client_timeout_after_publishing_may_have_run(make_daemon):
    """Defect 6: the client's own deadline passing after the request was published is not
    "did not run" (the daemon may be running it)."""
    from handlers_for_tests import wait_for

    from tensord.contract.errors import DeadlineError, safe_to_retry

    d = make_daemon()
    with Client(d.path) as c:
        with pytest.raises(DeadlineError) as e:
            c.infer("gate", {"x": torch.tensor([1.0])}, timeout=0.5, budget=60)
        wait_for(d.gate / "started")
        assert not safe_to_retry(e.value), "it was published and is running"


def test_python_client_refuses_blocking_eventfds():
    """Defect 10: SPEC §2.4 says the welcome's eventfds MUST be O_NONBLOCK; the Python
    client checks it (the Go client does), and closes every descriptor it got."""
    import os

    from tensord.contract.errors import ProtocolError
    from tensord.transport.segment import Segment

    daemon_side = Segment.create("nonblock", 65536, 65536)
    try:
        fds = [os.dup(daemon_side.fd)] + [os.eventfd(0) for _ in range(4)]  # blocking
        size = daemon_side.header.segment_size
        with pytest.raises(ProtocolError, match="O_NONBLOCK"):
            Segment.attach(fds, size, 65536, 65536)
        for f in fds:
            with pytest.raises(OSError):
                os.fstat(f)
        ok = [os.dup(daemon_side.fd)] + [os.dup(e) for e in daemon_side.efds]
        Segment.attach(ok, size, 65536, 65536).close()
    finally:
        daemon_side.close()


def test_hello_client_name_is_cut_at_128_bytes(tmp_path):
    """Defect 10: SPEC says the client name is at most 128 bytes; a name of 128 characters
    of 2 bytes each is cut to 64 characters, at a character boundary."""
    d = start_daemon(tmp_path, "--log-level", "INFO")
    try:
        with Client(d.path, name="ż" * 200) as c:
            c.ping()
        end = time.monotonic() + 10
        while "session" not in d.logs() or "'ż" not in d.logs():
            assert time.monotonic() < end, d.logs()
            time.sleep(0.05)
        logged = d.logs().split("'ż", 1)[1]
        name = "ż" + logged.split("'", 1)[0]
        assert name == "ż" * 64, len(name)
    finally:
        assert d.stop() == 0, d.logs()


def test_a_sessions_memory_counts_until_it_is_freed_not_until_it_disconnects(make_daemon):
    """Defect 10: a session whose connection closed while its request still runs keeps its
    segment mapped; its bytes count against max_memory until the segment is freed."""
    import socket
    import threading

    from handlers_for_tests import wait_for

    from tensord.contract.errors import ResourceError

    seg = 4096 + 2 * 65536
    d = make_daemon(daemon=f"max_memory = {seg}\nmax_memory_per_uid = 0")  # one uid here
    a = Client(d.path, request_ring=65536, response_ring=65536)
    def call():
        from tensord.contract.errors import TensordError

        with pytest.raises(TensordError):  # its connection goes away under it
            a.infer("gate", {"x": torch.tensor([1.0])}, timeout=60)

    t = threading.Thread(target=call)
    t.start()
    wait_for(d.gate / "started")
    a.sock.shutdown(socket.SHUT_RDWR)  # the client goes away while its request runs
    t.join()
    a.close()
    time.sleep(0.3)  # the daemon has read the EOF
    with pytest.raises(ResourceError, match="max_memory"):
        Client(d.path, request_ring=65536, response_ring=65536).close()
    (d.gate / "open").touch()  # the request finishes; the session's segment is freed
    end = time.monotonic() + 30
    while True:
        try:
            with Client(d.path, request_ring=65536, response_ring=65536) as b:
                assert b.infer("identity", {"x": torch.tensor([3, 1])})["y"].tolist() == [3, 1]
            break
        except ResourceError:
            assert time.monotonic() < end, "the freed session's memory was never released"
            time.sleep(0.05)
