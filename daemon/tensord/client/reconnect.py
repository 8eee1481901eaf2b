"""A client that outlives its daemon: after the session ends (the daemon restarted, crashed or
is draining) it dials again with jittered, capped backoff, and calls made meanwhile wait for
the new session within their own time limit instead of failing (as nats.go and pgxpool do).

    c = ReconnectingClient(retry=True)      # retry calls that certainly did not run
    out = c.infer("mlp", {"x": x}, timeout=1.0)

It dials on first use, so a service may start before the daemon: calls wait for it within
their time limit, or fail at once with `fail_fast=True` while no daemon answers. A request to
an idempotent model (SPEC §6) that may have run when its session ended under it is made once
more on the next session (`retry_idempotent`, default on).
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
                 on_reconnect: Callable[[Client], None] | None = None,
                 fail_fast: bool = False, retry_idempotent: bool = True, **client_options):
        self.path = path
        self.reconnect_wait = reconnect_wait
        self.max_reconnect_wait = max_reconnect_wait
        self.max_reconnects = max_reconnects
        self.retry = retry
        self.on_disconnect = on_disconnect
        self.on_reconnect = on_reconnect
        self.fail_fast = fail_fast
        self.retry_idempotent = retry_idempotent
        self._options = client_options
        self._idempotent: dict[str, bool] | None = None  # the current session's models
        self._lock = threading.Lock()
        self._client: Client | None = None
        self._closed = False
        self.reconnects = 0  # sessions dialled after the first

    # -- the session ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether there is a session that takes new calls now (False before the first
        call, while the daemon is away or draining, and after close)."""
        c = self._client
        return c is not None and not c._closed_reason and not c.draining and not self._closed

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
                    if self.fail_fast or \
                            self.max_reconnects is not None and attempts > self.max_reconnects:
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
                self._idempotent = None
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
        replayed = False

        def call(c: Client):
            left = None if deadline is None else max(deadline - time.monotonic(), 1e-6)
            return c.infer(model, inputs, timeout=left,
                           budget=budget if budget is not None else left, priority=priority)
        while True:
            idempotent = self.retry_idempotent and self._is_idempotent(model, deadline)
            try:
                return self._call(None if deadline is None else
                                  max(deadline - time.monotonic(), 0.0), call)
            except ConnectionClosedError as e:
                # Sent, then the session ended under it (the daemon died): it may have run.
                # For an idempotent model that is harmless: make it once more.
                if not idempotent or replayed or e.ran is not None or self._closed or \
                        deadline is not None and time.monotonic() >= deadline:
                    raise
                replayed = True

    def _is_idempotent(self, model: str, deadline: float | None) -> bool:
        """What the current session's daemon says of the model (asked once per session)."""
        table = self._idempotent
        if table is None:
            try:
                left = None if deadline is None else max(deadline - time.monotonic(), 1e-3)
                models = self.models(timeout=left)
            except TensordError:
                return False
            table = self._idempotent = {m.name: bool(m.idempotent) for m in models}
        return table.get(model, False)

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
