"""Files a new user would have for the built-in handlers, made the way they would make them:
networks exported with `tensord export` (random weights, from builtin_models.py), a
tokenizer.json, labels files, and a daemon config that serves them with no Python.

Shared by test_builtin_handlers.py and test_gateway.py (import the fixture by name)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
IMAGENET_LABELS = HERE.parent / "daemon/tensord/examples/imagenet_classes.txt"
SENTIMENT = ("negative", "neutral", "positive")

for _module in ("PIL", "tokenizers", "transformers"):
    pytest.importorskip(_module, reason="the test extra is not installed "
                                        "(TENSORD_EXTRAS=test,examples bash daemon/setup.sh)")


@dataclass
class BuiltinFiles:
    dir: Path
    resnet: Path  # TorchScript (traced)
    bert: Path  # BertForSequenceClassification, TorchScript (traced)
    encoder: Path  # BertModel, TorchScript (traced)
    tokenizer: Path
    sentiment_labels: Path

    def config(self) -> str:
        """The daemon config a user would write: three models, no Python."""
        return f'''
[daemon]
builtin_models = true

[[models]]
name = "resnet18"
source = "vision.classify"
path = "{self.resnet}"
labels = "{IMAGENET_LABELS}"
device = "cpu"

[models.options]
logits = true

[[models]]
name = "sentiment"
source = "text.classify"
path = "{self.bert}"
tokenizer = "{self.tokenizer}"
labels = "{self.sentiment_labels}"
device = "cpu"

[[models]]
name = "sentences"
source = "text.embed"
path = "{self.encoder}"
tokenizer = "{self.tokenizer}"
device = "cpu"
'''


def tensord_export(factory: str, out: Path, *inputs: str, method: str = "trace") -> Path:
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    args = [a for i in inputs for a in ("--input", i)]
    r = subprocess.run([sys.executable, "-m", "tensord", "export", f"builtin_models:{factory}",
                        *args, "--method", method, "-o", str(out)],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.fixture(scope="session")
def builtin_files(tmp_path_factory) -> BuiltinFiles:
    import builtin_models

    d = tmp_path_factory.mktemp("builtin")
    text = ("input_ids:i64:2,16", "attention_mask:i64:2,16")
    files = BuiltinFiles(
        dir=d,
        resnet=tensord_export("resnet18", d / "resnet18.pt", "x:f32:2,3,224,224"),
        bert=tensord_export("bert_classifier", d / "bert.pt", *text),
        encoder=tensord_export("bert_encoder", d / "encoder.pt", *text),
        tokenizer=d / "tokenizer.json",
        sentiment_labels=d / "sentiment.txt",
    )
    builtin_models.write_tokenizer(str(files.tokenizer))
    files.sentiment_labels.write_text("\n".join(SENTIMENT) + "\n")
    return files
