"""Log lines that a client can cause, rate-limited: a flood of bad requests or connections
must not become a flood of log lines (or tracebacks)."""

from __future__ import annotations

import logging
import threading
import time


class RateLimited:
    """At most `burst` lines per `period` seconds through `logger`; the lines dropped are
    counted and reported with the next line that gets through. Thread-safe."""

    def __init__(self, logger: logging.Logger, burst: int = 10, period: float = 10.0):
        self.logger = logger
        self.burst = burst
        self.period = period
        self._lock = threading.Lock()
        self._window = 0.0
        self._sent = 0
        self._dropped = 0

    def log(self, level: int, msg: str, *args, exc_info: bool = False) -> bool:
        """Log one line if the budget allows; True when it was logged."""
        if not self.logger.isEnabledFor(level):
            return False
        now = time.monotonic()
        with self._lock:
            if now - self._window >= self.period:
                self._window, self._sent = now, 0
            if self._sent >= self.burst:
                self._dropped += 1
                return False
            self._sent += 1
            dropped, self._dropped = self._dropped, 0
        if dropped:
            msg += f" ({dropped} similar lines dropped)"
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def info(self, msg: str, *args) -> bool:
        return self.log(logging.INFO, msg, *args)

    def warning(self, msg: str, *args) -> bool:
        return self.log(logging.WARNING, msg, *args)

    def exception(self, msg: str, *args) -> bool:
        """A daemon bug: the traceback with the first lines of a burst, one line after."""
        return self.log(logging.ERROR, msg, *args, exc_info=self._sent < 2)


class PerUid:
    """Session lines (opened, closed, ended by an error), at most `burst` per uid per
    `period` seconds; past that they are counted, and one summary line per uid tells what
    the period held ("uid 1000 in the last 10 s: 14549 sessions opened, 14549 closed").
    A client that churns sessions (any local user can) then costs a few lines a period
    instead of two per session. The summary is written by `flush`, which the control loop
    calls at `next_flush()`; a line that arrives after its uid's period has ended flushes
    that uid first. Thread-safe."""

    KINDS = ("opened", "closed", "ended by an error")

    def __init__(self, logger: logging.Logger, burst: int = 5, period: float = 10.0):
        self.logger = logger
        self.burst = burst
        self.period = period
        self._lock = threading.Lock()
        # uid -> [window start, lines logged, counts by kind]
        self._uids: dict[int, list] = {}

    def log(self, uid: int, kind: str, level: int, msg: str, *args) -> bool:
        """Log one line about a session of `uid` if its budget allows; `kind` is one of KINDS
        (what the summary counts). True when the line was logged."""
        now = time.monotonic()
        with self._lock:
            w = self._uids.get(uid)
            if w is not None and now - w[0] >= self.period:
                self._summarise(uid, w, now)
                w = None
            if w is None:
                w = self._uids[uid] = [now, 0, dict.fromkeys(self.KINDS, 0)]
            w[2][kind] += 1
            if w[1] >= self.burst:
                return False
            w[1] += 1
        self.logger.log(level, msg, *args)
        return True

    def next_flush(self) -> float | None:
        """When the earliest period with lines left unlogged ends (time.monotonic()); None
        when there is nothing to summarise."""
        with self._lock:
            ends = [w[0] + self.period for w in self._uids.values()
                    if sum(w[2].values()) > w[1]]
        return min(ends, default=None)

    def flush(self, everything: bool = False) -> None:
        """Summarise every uid whose period has ended (or every uid: the daemon stops)."""
        now = time.monotonic()
        with self._lock:
            for uid, w in list(self._uids.items()):
                if everything or now - w[0] >= self.period:
                    self._summarise(uid, w, now)

    def _summarise(self, uid: int, w: list, now: float) -> None:  # noqa: ARG002
        del self._uids[uid]
        counts = w[2]
        if sum(counts.values()) <= w[1]:
            return  # every line was logged: nothing to add
        opened, closed, failed = (counts[k] for k in self.KINDS)
        self.logger.info("uid %d in %g s: %d sessions opened, %d closed, %d ended by an error "
                         "(%d of those lines logged, at most %d per uid per %g s)", uid,
                         self.period, opened, closed, failed, w[1], self.burst, self.period)
