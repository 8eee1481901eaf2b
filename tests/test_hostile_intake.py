"""Issue 19.2: no single request stalls intake for other sessions. One 64 MiB `identity`
request of 11.2 M two-byte strings used to hold the dispatcher (the thread that reads every
session's ring) for hundreds of milliseconds: its length table was checked, and its bytes
copied, there. Large identity requests now go to a worker of their own; the daemon's
`tensord_dispatch_longest_pass_seconds` says how long the dispatcher ever spent on one
session's records at once."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import start_daemon, wait_until
from test_metrics import scrape_unix, value

from tensord.client import ByteStrings, Client
from tensord.contract.errors import BadInputError, TooLargeError

MiB = 1 << 20
LENGTHS = """
[[models]]
name = "lengths"
source = "handler"
handler = "handlers_for_tests:Lengths"
warmup = false
"""


def _strings(n: int, seed: int) -> ByteStrings:
    """n two-byte strings in wire form, each pair of bytes this request's own."""
    data = np.random.default_rng(seed).integers(0, 256, 2 * n, dtype=np.uint8).tobytes()
    return ByteStrings.from_encoded(np.full(n, 2, "<u4").tobytes() + data, (n,))


def test_a_huge_identity_request_does_not_hold_up_the_dispatcher(tmp_path):
    msock = tmp_path / "metrics.sock"
    d = start_daemon(tmp_path, config=f'[daemon]\nmetrics = "unix:{msock}"\n' + LENGTHS)
    try:
        with Client(d.path, request_ring=128 * MiB, response_ring=128 * MiB) as big, \
                Client(d.path) as small:
            for seed in range(3):
                x = _strings(11_200_000, seed)
                y = big.infer("identity", {"x": x}, timeout=120)["y"]
                assert isinstance(y, ByteStrings) and y.encode() == x.encode()
                v = np.arange(seed, seed + 256, dtype=np.float32)
                np.testing.assert_array_equal(small.infer("identity", {"x": v})["y"], v)
            # Checked as intake checks them, off the dispatcher too: lengths that do not add
            # up, and bools that are not 0 or 1, each past the inline size.
            n = 2 * MiB
            table = np.full(n, 2, "<u4")
            table[-1] = 3
            bad = ByteStrings.from_encoded(table.tobytes() + b"\0" * (2 * n), (n,))
            with pytest.raises(BadInputError, match="lengths add up to"):
                big.infer("identity", {"x": bad})
            flags = np.zeros(4 * MiB, dtype=np.uint8)
            flags[-1] = 2
            with pytest.raises(BadInputError, match="bool tensor holds bytes other than 0 "
                                                   "and 1"):
                big.infer("identity", {"x": flags.view(np.bool_)})
            ok = (np.arange(4 * MiB) % 2).astype(np.bool_)
            np.testing.assert_array_equal(big.infer("identity", {"x": ok})["y"], ok)
            # A model's large bytes input is checked by its worker as it gathers it: good
            # strings reach the model, a table that lies is refused naming the input.
            texts = _strings(300_000, 5)
            got = big.infer("lengths", {"x": texts}, timeout=60)["n"]
            np.testing.assert_array_equal(got, np.full(300_000, 2))
            n = 11_200_000
            table = np.full(n, 2, "<u4")
            table[n // 2] = 1 << 20
            lies = ByteStrings.from_encoded(table.tobytes() + b"\1" * (2 * n), (n,))
            with pytest.raises(BadInputError, match="lengths add up to") as e:
                big.infer("lengths", {"x": lies}, timeout=60)
            assert e.value.input == "x"
            # ... and logged like the dispatcher's refusals (the log, stats and metrics agree)
            wait_until(lambda: "answered BAD_INPUT: input 'x': bytes tensor lengths add up "
                               "to" in d.logs(), "the refusal in the log")
            (stat,) = [s for s in big.stats() if s.name == "lengths"]
            assert stat.bad_input == 1 and stat.served == 1, stat
        # A response that cannot fit the client's ring is refused before anything is copied.
        with Client(d.path, request_ring=8 * MiB, response_ring=65536) as narrow:
            with pytest.raises(TooLargeError, match="response ring of at least 4194304"):
                narrow.infer("identity", {"x": np.ones(2 * MiB, dtype=np.uint8)})
            v = np.arange(1000, dtype=np.int64)
            np.testing.assert_array_equal(narrow.infer("identity", {"x": v})["y"], v)
        longest = value(scrape_unix(str(msock)), "tensord_dispatch_longest_pass_seconds")
        # Before: 0.1-0.3 s per huge request. Now intake reads a descriptor per record.
        assert 0 < longest < 0.05, longest
        assert "Traceback" not in d.logs(), d.logs()
    finally:
        assert d.stop() == 0, d.logs()
