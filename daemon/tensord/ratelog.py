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
