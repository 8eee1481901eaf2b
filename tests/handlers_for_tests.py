"""Handlers that misbehave on purpose, for tests/test_handlers.py."""


import os
import time

from tensord.contract.errors import BadInputError
from tensord.models.handler import Handler
from tensord.models.signature import Spec


class Doubler(Handler):
    inputs = (Spec("x", "f32", (-1,)),)
    outputs = (Spec("y", "f32", (-1,)),)

    def load(self, ctx):
        self.factor = float(ctx.options.get("factor", 2.0))

    def forward(self, batch):
        (x,) = batch
        if bool((x < 0).any()):
            raise BadInputError("x must not be negative")
        if bool((x > 1e6).any()):
            raise RuntimeError("overflow in the model")
        return [x * self.factor]


class WrongShape(Doubler):
    def forward(self, batch):
        return [batch[0].reshape(1, -1)]


class FailsToLoad(Doubler):
    def load(self, ctx):
        raise FileNotFoundError("weights.bin is missing")


class NotAHandler:
    pass


class StrNotBytes(Doubler):
    """Returns str items for a bytes output: the daemon must refuse, not send garbage."""

    outputs = (Spec("y", "bytes", (-1,)),)

    def forward(self, batch):
        from tensord.contract.dtypes import ByteStrings

        return [ByteStrings(["abc"] * batch[0].shape[0], (batch[0].shape[0],))]


class Gate(Handler):
    """A model whose forward pass the test controls, so tests wait on observable state instead
    of calibrating sleeps: each call creates `<dir>/started`, then blocks until `<dir>/open`
    exists, and returns x + the number in `<dir>/value` read at load (0 when absent)."""

    inputs = (Spec("x", "f32", (-1,)),)
    outputs = (Spec("y", "f32", (-1,)),)

    def load(self, ctx):
        self.dir = ctx.options["dir"]
        try:
            with open(os.path.join(self.dir, "value")) as f:
                self.add = float(f.read())
        except FileNotFoundError:
            self.add = 0.0

    def forward(self, batch):
        (x,) = batch
        self.hold(x)
        return [x + self.add]

    def hold(self, x):
        """Record the call's rows, say it started, and wait until the test opens the gate."""
        with open(os.path.join(self.dir, "calls"), "a") as f:  # each row's first value, in order
            f.write("".join(f"{float(v)}\n" for v in x.reshape(len(x), -1)[:, 0]) + "-\n")
        open(os.path.join(self.dir, "started"), "w").close()
        end = time.monotonic() + 120  # a forgotten gate must not hang the suite forever
        while not os.path.exists(os.path.join(self.dir, "open")):
            if time.monotonic() > end:
                raise RuntimeError("gate was never opened")
            time.sleep(0.005)


class GatedEmbedding(Gate):
    """A gate whose pass looks its rows up in a 10-row embedding table with torch, so an index
    out of range raises torch's own IndexError, as a real model's would. Row i of the table is
    [i, i + 0.25, i + 0.5, i + 0.75]: every answer says which index it came from."""

    inputs = (Spec("x", "i64", (-1,)),)
    outputs = (Spec("y", "f32", (-1, 4)),)

    def load(self, ctx):
        super().load(ctx)
        import torch

        self.weight = torch.arange(10, dtype=torch.float32)[:, None] + torch.tensor(
            [0.0, 0.25, 0.5, 0.75])

    def forward(self, batch):
        import torch

        (x,) = batch
        self.hold(x)
        return [torch.nn.functional.embedding(x, self.weight)]


class WriteFails(Doubler):
    """Returns a bytes output that raises while it is written into the response ring."""

    outputs = (Spec("y", "bytes", (-1,)),)

    def forward(self, batch):
        from tensord.contract.dtypes import ByteStrings

        class Exploding(ByteStrings):
            __slots__ = ()

            def encode_into(self, buf):
                raise OSError("simulated fault while copying outputs into the ring")

            def encode(self):
                raise OSError("simulated fault while copying outputs into the ring")

        n = batch[0].shape[0]
        return [Exploding([b"never seen"] * n, (n,))]


def gate_config(d, **keys) -> dict:
    return {"source": "handler", "handler": "handlers_for_tests:Gate", "warmup": False,
            "options": {"dir": str(d)}, **keys}


def gate_calls(d) -> list[list[float]]:
    """The forward passes the gate ran, in order: each a list of row values."""
    try:
        text = open(os.path.join(d, "calls")).read()
    except FileNotFoundError:
        return []
    calls, cur = [], []
    for line in text.splitlines():
        if line == "-":
            calls.append(cur)
            cur = []
        else:
            cur.append(float(line))
    return calls


def wait_for(path, timeout: float = 60.0) -> None:
    """Block until `path` exists (the gate's `started` marker)."""
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.005)


class Overlap(Doubler):
    """Counts how many forward passes run at once (`<dir>/max` holds the most seen)."""

    def load(self, ctx):
        import threading

        super().load(ctx)
        self.dir = ctx.options["dir"]
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0

    def forward(self, batch):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            with open(os.path.join(self.dir, "max"), "w") as f:
                f.write(str(self.most))
        time.sleep(0.002)
        with self.lock:
            self.now -= 1
        return super().forward(batch)


class Lengths(Handler):
    """Each byte string's length: a model with a `bytes` input (the per-request path) that
    declares no per-item limits."""

    inputs = (Spec("x", "bytes", (-1,)),)
    outputs = (Spec("n", "i64", (-1,)),)

    def load(self, ctx):
        pass

    def forward(self, batch):
        import torch

        (x,) = batch
        return [torch.tensor([len(s) for s in x.items], dtype=torch.int64)]
