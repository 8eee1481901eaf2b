"""The shared-memory rings over a real /dev/shm segment (both sides in this process)."""

from __future__ import annotations

import os
import struct

import pytest

from tensord.contract.errors import ProtocolError, ResourceError
from tensord.contract.layout import KIND_PAD, KIND_REQUEST, KIND_RESPONSE, REQ_CONTROL, RecordHeader
from tensord.transport.segment import EFD_REQ_DATA, EFD_RESP_DATA, Segment, available_memory

CAP = 65536


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def pair():
    before = open_fds()
    daemon = Segment.create("0" * 32, CAP, CAP)
    client = Segment.attach([os.dup(f) for f in daemon.descriptors()],
                            daemon.header.segment_size, CAP, CAP)
    daemon.close_fd()
    yield daemon, client
    client.close()
    daemon.close()
    assert open_fds() <= before, "every descriptor of the session is closed"


def put(client: Segment, n: int, rid: int) -> int:
    off = client.requests.try_reserve(n)
    assert off is not None
    RecordHeader(n, KIND_REQUEST, rid, 0).pack_into(client.buf, off)
    client.requests.publish()
    return off


def test_nothing_has_a_name_and_the_mapping_is_shared(pair):
    daemon, client = pair
    put(client, 128, 1)
    (rec,) = daemon.requests.poll()
    assert rec.request_id == 1
    assert not [e for e in os.listdir("/dev/shm") if "tensord" in e]


def test_wakeups_cross_over_the_eventfds(pair):
    """A waiter that sleeps (flag set) is posted; one that does not is not."""
    daemon, client = pair
    req = daemon.req_ctl
    flag, efd = req.consumer_waiting, daemon.efds[EFD_REQ_DATA]
    assert client.shm.notify(flag, client.efds[EFD_REQ_DATA]) is False  # nobody sleeps
    with pytest.raises(BlockingIOError):
        os.eventfd_read(efd)
    req.set_flag(flag, 1)
    assert client.shm.notify(flag, client.efds[EFD_REQ_DATA]) is True
    assert os.eventfd_read(efd) == 1


def test_wait_returns_when_the_counter_moves_and_times_out_otherwise(pair):
    daemon, client = pair
    resp = client.resp_ctl
    args = (resp.tail_at, 0, resp.consumer_waiting, client.efds[EFD_RESP_DATA], 0)
    assert client.shm.wait(*args, 1_000_000) is False  # 1 ms, nothing published
    off = daemon.responses.try_reserve(64)
    RecordHeader(64, KIND_RESPONSE, 5, 0).pack_into(daemon.buf, off)
    daemon.responses.publish()
    assert client.shm.wait(*args, -1) is True  # no timeout: returns because tail moved


def test_wrap_writes_a_pad_and_starts_at_zero(pair):
    daemon, client = pair
    first = put(client, CAP - 1024, 1)
    (r1,) = daemon.requests.poll()
    daemon.requests.release(r1)
    # 1024 bytes are left before the end: a 2048-byte record must wrap behind a PAD.
    second = put(client, 2048, 2)
    assert second == daemon.header.request_ring_offset
    pad = RecordHeader.unpack_from(client.buf, first + CAP - 1024)
    assert (pad.kind, pad.record_len) == (KIND_PAD, 1024)
    (r2,) = daemon.requests.poll()
    assert r2.request_id == 2 and r2.offset == second


def test_full_ring_refuses_until_released(pair):
    daemon, client = pair
    put(client, CAP // 2, 1)
    put(client, CAP // 2, 2)
    assert client.requests.try_reserve(64) is None
    r1, r2 = daemon.requests.poll()
    assert daemon.requests.release(r2) is False, "head must not pass the unreleased r1"
    assert client.requests.try_reserve(64) is None
    assert daemon.requests.release(r1) is True
    assert client.requests.try_reserve(CAP) is not None


def test_out_of_order_release_moves_head_over_prefix_only(pair):
    daemon, client = pair
    for i in range(4):
        put(client, 1024, i)
    recs = daemon.requests.poll()
    head = lambda: struct.unpack_from("<Q", client.buf, REQ_CONTROL + 64)[0]  # noqa: E731
    daemon.requests.release(recs[2])
    daemon.requests.release(recs[1])
    assert head() == 0
    daemon.requests.release(recs[0])
    assert head() == 3 * 1024
    daemon.requests.release(recs[3])
    assert head() == 4 * 1024


@pytest.mark.parametrize("length", [0, 100, 64 * 3000])
def test_corrupt_record_length_is_rejected(pair, length):
    daemon, client = pair
    off = client.requests.try_reserve(128)
    RecordHeader(length, KIND_REQUEST, 1, 0).pack_into(client.buf, off)
    client.requests.publish()
    with pytest.raises(ProtocolError) as e:
        daemon.requests.poll()
    assert e.value.fatal and e.value.code.name == "BAD_RECORD"


def test_corrupt_tail_is_rejected(pair):
    daemon, client = pair
    client.req_ctl.set_tail(CAP * 3)
    with pytest.raises(ProtocolError, match="tail"):
        daemon.requests.poll()
    client.req_ctl.set_tail(65)
    with pytest.raises(ProtocolError, match="tail"):
        daemon.requests.poll()


def test_unknown_kind_is_rejected(pair):
    daemon, client = pair
    off = client.requests.try_reserve(128)
    RecordHeader(128, 9, 1, 0).pack_into(client.buf, off)
    client.requests.publish()
    with pytest.raises(ProtocolError, match="kind 9"):
        daemon.requests.poll()


def test_descriptor_longer_than_record_is_rejected(pair):
    daemon, client = pair
    off = client.requests.try_reserve(128)
    RecordHeader(128, KIND_REQUEST, 1, 200).pack_into(client.buf, off)
    client.requests.publish()
    with pytest.raises(ProtocolError, match="descriptor length 200"):
        daemon.requests.poll()


def test_segment_bigger_than_available_memory_fails_up_front():
    free, _ = available_memory()
    ring = 1 << (free.bit_length() + 1)
    before = open_fds()
    with pytest.raises(ResourceError) as e:
        Segment.create("1" * 32, ring, CAP)
    assert "WithRingSize" in e.value.message and "MiB" in e.value.message
    assert open_fds() <= before


def test_tail_moving_backwards_is_caught_even_above_the_read_position(pair):
    """SPEC §4.2: a tail below one already seen is corruption, also when the consumer has not
    read that far yet (it polled with a limit)."""
    daemon, client = pair
    for rid in (1, 2, 3):
        put(client, 128, rid)
    seen = client.req_ctl.tail()
    (r1,) = daemon.requests.poll(limit=1)  # reads one record, sees tail = 3 records
    assert r1.request_id == 1
    client.req_ctl.set_tail(seen - 128)  # back by one record, still above the read position
    with pytest.raises(ProtocolError, match="impossible") as e:
        daemon.requests.poll()
    assert e.value.fatal
