"""A BERT encoder (embeddings + post-LayerNorm transformer layers) in plain PyTorch.

Enough of BERT to run sentence-embedding checkpoints in Hugging Face's layout from a
safetensors file, without importing `transformers` (seconds of start-up and a large
dependency for ~60 lines of model). Inference only: no dropout, no pooler head.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text())
        if raw.get("model_type") != "bert" or raw.get("hidden_act", "gelu") != "gelu" or \
                raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: not a BERT config this encoder implements")
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__})


class _Layer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        h = c.hidden_size
        self.heads = c.num_attention_heads
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=c.layer_norm_eps)
        self.ffn_in = nn.Linear(h, c.intermediate_size)
        self.ffn_out = nn.Linear(c.intermediate_size, h)
        self.ffn_norm = nn.LayerNorm(h, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, h // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)),
                                           split(self.value(x)), attn_mask=keep)
        x = self.attn_norm(x + self.attn_out(a.transpose(1, 2).reshape(b, n, h)))
        # HF's "gelu" is the exact erf form, not the tanh approximation.
        return self.ffn_norm(x + self.ffn_out(F.gelu(self.ffn_in(x))))


class BertEncoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.config = c
        self.word = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token states [B, L, H] for token ids [B, L] and attention mask [B, L] (1 = token,
        0 = padding). Single-segment input: every token type is 0."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word(ids) + self.position(pos) + self.token_type.weight[0]
        x = self.norm(x)
        keep = mask.bool()[:, None, None, :]  # padding is never attended to
        for layer in self.layers:
            x = layer(x, keep)
        return x

    @classmethod
    def from_pretrained(cls, directory: Path) -> BertEncoder:
        """Build from `config.json` and `model.safetensors` in Hugging Face's BertModel layout."""
        model = cls(BertConfig.from_json(directory / "config.json"))
        state = {}
        for key, value in load_file(directory / "model.safetensors").items():
            key = key.removeprefix("bert.")
            if key.startswith("pooler.") or key == "embeddings.position_ids":
                continue  # the pooler head is unused; position ids are recomputed
            state[_rename(key)] = value
        model.load_state_dict(state, strict=True)
        return model


_RENAMES = (
    ("embeddings.word_embeddings.", "word."),
    ("embeddings.position_embeddings.", "position."),
    ("embeddings.token_type_embeddings.", "token_type."),
    ("embeddings.LayerNorm.", "norm."),
    ("encoder.layer.", "layers."),
    (".attention.self.", "."),
    (".attention.output.dense.", ".attn_out."),
    (".attention.output.LayerNorm.", ".attn_norm."),
    (".intermediate.dense.", ".ffn_in."),
    (".output.dense.", ".ffn_out."),
    (".output.LayerNorm.", ".ffn_norm."),
)


def _rename(key: str) -> str:
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key
