"""Logs a client cannot flood (issue 19.9): session churn wrote two INFO lines per session
(455 KB/s, ~39 GB a day). Session open/close and session-fatal errors are now limited per
uid, with one summary line per uid per period that counts everything."""

from __future__ import annotations

import collections
import os
import re
import struct
import threading
import time

from conftest import start_daemon

from tensord.client import Client
from tensord.contract.frames import encode_frame, read_frame, read_frame_with_fds
from tensord.contract.layout import REQ_CONTROL
from tensord.contract.messages import PROTOCOL_VERSION as V
from tensord.contract.messages import Attached, Error, Hello, Ready, Welcome

CHURN_S = 4.0
BURST, PERIOD = 5, 10.0  # ratelog.PerUid's defaults, as control/connection.py uses them
STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.\d{3} tensord ")


def bad_record_session(path: str) -> None:
    """A session whose client corrupts its request ring: the daemon ends it (BAD_RECORD)."""
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(path)
    s.sendall(encode_frame(Hello(V, V, "corrupt", 65536, 65536)))
    w, fds = read_frame_with_fds(s)
    assert isinstance(w, Welcome), w
    try:
        s.sendall(encode_frame(Attached()))
        assert isinstance(read_frame(s), Ready)
        # tail 13: not a multiple of 64, so the ring is corrupt (SPEC §4.2)
        os.pwrite(fds[0], struct.pack("<Q", 13), REQ_CONTROL)
        os.eventfd_write(fds[1], 1)
        msg = read_frame(s)
        assert isinstance(msg, Error) and msg.name == "BAD_RECORD" and msg.fatal, msg
    finally:
        for fd in fds:
            os.close(fd)
        s.close()


def test_session_churn_writes_a_bounded_number_of_lines(tmp_path):
    d = start_daemon(tmp_path)
    counts = collections.Counter()
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn(bad: bool) -> None:
        try:
            while not stop.is_set():
                if bad:
                    bad_record_session(d.path)
                    counts["bad"] += 1
                else:
                    Client(d.path, request_ring=65536, response_ring=65536).close()
                    counts["ok"] += 1
        except BaseException as e:  # reported by the test
            errors.append(e)

    start_lines = len(d.logs().splitlines())
    threads = [threading.Thread(target=churn, args=(i == 2,)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(CHURN_S)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    sessions = counts["ok"] + counts["bad"]
    assert counts["ok"] >= 50 and counts["bad"] >= 20, counts
    # Every session of this uid opened and ended within one period: one summary counts them.
    want = (f"uid {os.getuid()} in {PERIOD:g} s: {sessions} sessions opened, {sessions} "
            f"closed, {counts['bad']} ended by an error")
    end = time.monotonic() + PERIOD + 10
    while want not in d.logs():
        assert time.monotonic() < end, f"no summary line {want!r}:\n{d.logs()[-3000:]}"
        time.sleep(0.1)
    try:
        lines = d.logs().splitlines()[start_lines:]
        about_sessions = [ln for ln in lines if "session" in ln]
        print(f"{sessions} sessions ({counts['bad']} corrupt) in {CHURN_S:g} s: "
              f"{len(about_sessions)} log lines")
        # 5 lines of the uid's budget and the summary; before: two or three per session
        assert len(about_sessions) <= BURST + 1, "\n".join(about_sessions)
        # every line carries its time, and no second holds more than the budget
        per_second = collections.Counter()
        for ln in lines:
            m = STAMP.match(ln)
            assert m, f"a log line without a timestamp: {ln!r}"
            per_second[m.group(1)] += 1
        assert max(per_second.values()) <= BURST + 2, per_second
    finally:
        assert d.stop() == 0, d.logs()
