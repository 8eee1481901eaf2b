"""A client that outlives its daemon: after the session ends (the daemon restarted, crashed or
is draining) it dials again with jittered, capped backoff, and calls made meanwhile wait for
the new session within their own time limit instead of failing (as nats.go and pgxpool do).

    c = ReconnectingClient(retry=True)      # retry calls that certainly did not run
    out = c.infer("mlp", {"x": x}, timeout=1.0)
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping

from ..contract.errors import (
    ConnectionClosedError,
    DeadlineError,
    ShuttingDownError,
    TensordError,
    safe_to_retry,
)
from . import Client, Value


class ReconnectingClient:
    def __init__(self, path: str | None = None, *, reconnect_wait: float = 0.05,
                 max_reconnect_wait: float = 2.0, max_reconnects: int | None = None,
                 retry: bool = False, on_disconnect: Callable[[str], None] | None = None,
                 on_reconnect: Callable[[Client], None] | None = None, **client_options):
        self.path = path
        self.reconnect_wait = reconnect_wait
        self.max_reconnect_wait = max_reconnect_wait
        self.max_reconnects = max_reconnects
        self.retry = retry
        self.on_disconnect = on_disconnect
        self.on_reconnect = on_reconnect
        self._options = client_options
        self._lock = threading.Lock()
        self._client: Client | None = None
        self._closed = False
        self.reconnects = 0  # sessions dialled after the first

    # -- the session ------------------------------------------------------------------------

    def client(self, deadline: float | None = None) -> Client:
        """The live session, dialling one (with backoff, until `deadline`) if there is none."""
        with self._lock:
            c = self._client
            if c is not None and not c._closed_reason and not c.draining:
                return c
            if c is not None:
                self._client = None
                if self.on_disconnect:
                    self.on_disconnect(c._closed_reason or "the daemon is draining")
                c.close()
            wait, attempts, first = self.reconnect_wait, 0, c is None and self.reconnects == 0
            while True:
                if self._closed:
                    raise ConnectionClosedError("the client was closed")
                try:
                    c = Client(self.path, **self._options)
                except (ConnectionClosedError, ShuttingDownError, OSError) as e:
                    attempts += 1
                    if self.max_reconnects is not None and attempts > self.max_reconnects:
                        raise
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise DeadlineError(f"no tensord session within the time limit: "
                                            f"{e}") from None
                    pause = wait * random.uniform(0.5, 1.5)  # jitter: no herd of clients
                    time.sleep(pause if left is None else min(pause, left))
                    wait = min(wait * 2, self.max_reconnect_wait)
                    continue
                self._client = c
                if not first:
                    self.reconnects += 1
                    if self.on_reconnect:
                        self.on_reconnect(c)
                return c

    def _call(self, timeout: float | None, fn: Callable[[Client], object]):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            c = self.client(deadline)
            try:
                return fn(c)
            except TensordError as e:
                ended = isinstance(e, (ConnectionClosedError, ShuttingDownError))
                if not ended:
                    raise
                # The session is gone or going. A call that certainly did not run waits for
                # the next session (always when it never left this client; with retry=True
                # also when the daemon refused it unrun); one that may have run is the
                # caller's to judge.
                if not safe_to_retry(e):
                    raise
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                if not self.retry and not isinstance(e, ConnectionClosedError) and \
                        not c.draining:
                    raise

    # -- the calls, as on Client -------------------------------------------------------------

    def infer(self, model: str, inputs: Mapping[str, object], timeout: float | None = None,
              budget: float | None = None, priority: int = 0) -> dict[str, Value]:
        deadline = None if timeout is None else time.monotonic() + timeout

        def call(c: Client):
            left = None if deadline is None else max(deadline - time.monotonic(), 1e-6)
            return c.infer(model, inputs, timeout=left,
                           budget=budget if budget is not None else left, priority=priority)
        return self._call(timeout, call)

    def models(self, timeout: float | None = 10.0):
        return self._call(timeout, lambda c: c.models())

    def ping(self, timeout: float | None = 10.0) -> None:
        self._call(timeout, lambda c: c.ping())

    def health(self, timeout: float | None = 10.0):
        return self._call(timeout, lambda c: c.health())

    def stats(self, timeout: float | None = 10.0):
        return self._call(timeout, lambda c: c.stats())

    def close(self) -> None:
        with self._lock:
            self._closed = True
            c, self._client = self._client, None
        if c is not None:
            c.close()

    def __enter__(self) -> ReconnectingClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
