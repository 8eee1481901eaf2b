"""Handlers that misbehave on purpose, for tests/test_handlers.py."""


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
