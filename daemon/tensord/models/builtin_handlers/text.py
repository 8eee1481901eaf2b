"""`text.classify` and `text.embed`: text models from configuration alone.

    [[models]]
    name = "sentiment"
    source = "text.classify"            # or "text.embed"
    path = "bert.pt"                    # TorchScript or torch.export; or module = "pkg.mod:factory"
    tokenizer = "tokenizer.json"        # a Hugging Face `tokenizers` file
    labels = "labels.txt"               # text.classify: line i names class i

    [models.options]                    # every key is optional; these are the defaults
    max_tokens = 0                      # truncate longer texts; 0: tokenizer.json's, else 512
    padding = "longest"                 # longest: pad a batch to its longest text; max: max_tokens
    token_type_ids = false              # also pass token type ids (all 0) as a third input
    output = 0                          # which of the network's outputs to use
    max_batch = 64                      # texts per request
    max_bytes = 1048576                 # bytes of one text
    max_chars = 0                       # characters tokenized per text; 0: 32 x max_tokens
    # text.classify only
    top_k = 5                           # at most the number of classes
    scores = "softmax"                  # softmax | sigmoid | none (the logits themselves)
    logits = false                      # also return the logits f32 [N, classes]
    # text.embed only
    pooling = "mean"                    # mean (over the tokens) | cls (the first token) | none
    normalize = true                    # unit-length embeddings: cosine similarity = dot product

Input `text`: bytes [N], UTF-8 strings. The network is called as `net(input_ids,
attention_mask[, token_type_ids])`, all i64 [N, L]: the texts of a batch, padded to the longest
one (or to max_tokens) with the tokenizer's pad id, the mask 1 on tokens and 0 on padding.
Requests the scheduler joins into one batch are tokenized together, so they pad once, in one
forward pass. A network exported with a fixed sequence length (torch.export specialises it)
needs padding = "max" and max_tokens set to that length; the load says so when it is missing.

text.classify returns labels bytes [N, K], scores f32 [N, K], classes i64 [N, K] (+ logits);
text.embed returns embedding f32 [N, D].

A text's cost is bounded by max_tokens, not by its length: only its first max_chars
characters are tokenized (a 1 MB text would otherwise be tokenized in full, about a second,
before truncation to max_tokens threw most of it away). A token covers a few characters of
ordinary text, so the cut changes nothing the model reads unless a text's first max_tokens
tokens average more than 32 characters each (long runs of spaces, say).
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from ...config import ConfigError, ModelConfig
from ...contract.dtypes import ByteStrings
from ...contract.errors import BadInputError, TensordError
from ...contract.messages import ModelLimits
from ..handler import Handler
from ..signature import Spec, Value
from .common import (
    SCORES,
    Options,
    TopK,
    class_labels,
    first_output,
    load_network,
    resolve_file,
    split_rows,
)

COMMON: dict[str, Any] = {"max_tokens": 0, "padding": "longest", "token_type_ids": False,
                          "output": 0, "max_batch": 64, "max_bytes": 1 << 20, "max_chars": 0}
DEFAULT_MAX_TOKENS = 512
CHARS_PER_TOKEN = 32  # the default max_chars: this many characters per token kept


class _Text(Handler):
    """Tokenizes and pads; subclasses say what the network's output becomes."""

    OPTIONS: dict[str, Any] = {}

    def __init__(self, mc: ModelConfig, device: torch.device, dtype: torch.dtype):
        o = Options(mc, {**COMMON, **self.OPTIONS})
        self.name, self.device, self.dtype = mc.name, device, dtype
        if not mc.tokenizer:
            raise ConfigError(f"model {mc.name!r} ({mc.source}) needs tokenizer = a "
                              "tokenizer.json file (Hugging Face `tokenizers` format)")
        path = resolve_file(mc.tokenizer, "tokenizer", mc.name)
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers package raises plain Exceptions
            raise ConfigError(f"model {mc.name!r}: {path} is not a tokenizer.json: {e}") from None
        own = json.loads(path.read_text(encoding="utf-8"))
        max_tokens = o.int("max_tokens", 0, 1 << 20) or \
            ((own.get("truncation") or {}).get("max_length") or DEFAULT_MAX_TOKENS)
        self.max_tokens = max_tokens
        self.max_chars = o.int("max_chars") or CHARS_PER_TOKEN * max_tokens
        self.fixed = o.choice("padding", ("longest", "max")) == "max"
        self.token_types = o.bool("token_type_ids")
        self.output = o.int("output", 0, 63)
        self.pad_id = _pad_id(self.tokenizer, own)
        # We pad ourselves (to the longest text of the whole batch, after the scheduler joined
        # requests); the file's own settings often pad every text to a fixed length.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_tokens)
        self.limits = ModelLimits(max_batch=o.int("max_batch"), max_bytes=o.int("max_bytes"),
                                  max_tokens=max_tokens)
        self.net = load_network(mc, device, dtype)
        self.inputs = (Spec("text", "bytes", (-1,), "text"),)
        self._configure(mc, o)

    def _configure(self, mc: ModelConfig, o: Options) -> None:
        raise NotImplementedError

    def example_inputs(self) -> list[Value]:
        return [ByteStrings([b"tensord warms up its models before serving them."], (1,))]

    def _probe(self, mc: ModelConfig) -> torch.Tensor:
        """Run the network on two texts of different lengths: learn its output's shape, and
        catch a network exported for one sequence length before a caller does."""
        texts = ["tensord", "tensord warms up its models before serving them, twice."]
        ids = [e.ids for e in self.tokenizer.encode_batch(texts)]
        try:
            with torch.inference_mode():
                return self._run(self.collate_ids(ids))
        except (TensordError, RuntimeError, AssertionError) as e:
            hint = "" if self.fixed else (
                " (a network exported for one sequence length needs padding = \"max\" and "
                "max_tokens = that length in [models.options])")
            raise ConfigError(f"model {mc.name!r}: the network failed on a padded batch of "
                              f"token ids [2, L]: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}{hint}") from None

    # -- the handler interface ---------------------------------------------------------------

    def preprocess(self, inputs: list[Value]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, i64 [N, L], padded to the longest text."""
        (texts,) = inputs
        if not isinstance(texts, ByteStrings):
            raise BadInputError("input 'text' must be a bytes tensor of UTF-8 strings",
                                input="text")
        strings = []
        for i, b in enumerate(texts.items):
            if self.limits.max_bytes and len(b) > self.limits.max_bytes:
                raise BadInputError(f"input 'text' item {i}: {len(b)} bytes, model "
                                    f"{self.name!r} takes at most {self.limits.max_bytes} "
                                    "(limits.max_bytes)", input="text", item=i,
                                    limit=self.limits.max_bytes)
            try:
                s = b.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = " ".join(f"0x{c:02x}" for c in b[e.start:e.start + 4])
                raise BadInputError(f"input 'text' item {i}: not valid UTF-8 ({e.reason} at "
                                    f"byte {e.start}: {bad})", input="text", item=i) from None
            # Cut before tokenizing: what lies past max_tokens is thrown away anyway.
            strings.append(s[:self.max_chars])
        return self.collate_ids([e.ids for e in self.tokenizer.encode_batch(strings)])

    def collate_ids(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad token id lists to one [N, L] batch (L: the longest, or max_tokens) with its
        attention mask."""
        length = self.max_tokens if self.fixed else max([len(x) for x in ids] + [1])
        batch = torch.full((len(ids), length), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(ids), length), dtype=torch.int64)
        for i, x in enumerate(ids):
            batch[i, :len(x)] = torch.tensor(x, dtype=torch.int64)
            mask[i, :len(x)] = 1
        return batch, mask

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
        if batch[0].shape[0] == 0:
            return None
        return self._run(batch)

    def _run(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, mask = (t.to(self.device, non_blocking=True) for t in batch)
        args = (ids, mask, torch.zeros_like(ids)) if self.token_types else (ids, mask)
        out = first_output(self.net(*args), self.output, self.name)
        return self._finish(out, mask)

    def _finish(self, out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return out

    def split(self, outputs: list[Value], sizes: list[int]) -> list[list[Value]]:
        """Joined requests' rows (labels are K items a row)."""
        return split_rows(outputs, sizes)


class TextClassify(_Text):
    OPTIONS = {"top_k": 5, "scores": "softmax", "logits": False}

    def _configure(self, mc: ModelConfig, o: Options) -> None:
        logits = self._probe(mc)
        if logits.dim() != 2:
            raise ConfigError(f"model {mc.name!r}: the network returned shape "
                              f"{list(logits.shape)}; text.classify needs logits [N, classes] "
                              "(choose them with option output = i)")
        self.classes = int(logits.shape[1])
        top_k = min(o.int("top_k", 1), self.classes) if "top_k" not in mc.options else \
            o.int("top_k", 1)
        if top_k > self.classes:
            raise ConfigError(f"model {mc.name!r}: top_k {top_k} is more than the network's "
                              f"{self.classes} classes")
        scores, want_logits = o.choice("scores", SCORES), o.bool("logits")
        self.head = TopK(class_labels(mc, self.classes), top_k, scores, want_logits)
        self.outputs = TopK.specs(top_k, self.classes, want_logits)

    def postprocess(self, outputs: Any) -> list[Value]:
        return self.head.empty(self.classes) if outputs is None else self.head(outputs)


class TextEmbed(_Text):
    OPTIONS = {"pooling": "mean", "normalize": True}

    def _configure(self, mc: ModelConfig, o: Options) -> None:
        self.pooling = o.choice("pooling", ("mean", "cls", "none"))
        self.normalize = o.bool("normalize")
        out = self._probe(mc)
        if out.dim() != 2:
            want = "[N, L, D] token states" if self.pooling == "none" else "[N, D]"
            raise ConfigError(f"model {mc.name!r}: pooling {self.pooling!r} made shape "
                              f"{list(out.shape)} of the network's output; text.embed needs "
                              f"{want} (see options pooling and output)")
        self.dim = int(out.shape[1])
        self.outputs = (Spec("embedding", "f32", (-1, self.dim), "embedding"),)

    def _finish(self, out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = out.float()  # pool and normalise in f32 whatever the network's precision
        if self.pooling == "mean" and out.dim() == 3:
            m = mask.unsqueeze(-1).to(out.dtype)
            out = (out * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        elif self.pooling == "cls" and out.dim() == 3:
            out = out[:, 0]
        if self.normalize and out.dim() == 2:
            out = F.normalize(out, p=2, dim=1)
        return out

    def postprocess(self, outputs: Any) -> list[Value]:
        if outputs is None:
            return [torch.empty((0, self.dim))]
        return [outputs.cpu().contiguous()]


def _pad_id(tok: Tokenizer, own: dict) -> int:
    padding = own.get("padding") or {}
    if isinstance(padding.get("pad_id"), int):
        return padding["pad_id"]
    for t in ("[PAD]", "<pad>", "<|pad|>"):
        i = tok.token_to_id(t)
        if i is not None:
            return i
    return 0
