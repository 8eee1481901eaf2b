"""Model factories for the `tensord export` tests."""

import torch
from torch import nn


class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).relu().mean(dim=(2, 3)))


class Branchy(nn.Module):
    """Data-dependent control flow: tracing bakes in one branch, scripting keeps both."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > 0):
            return x * 2
        return x - 100


def conv() -> nn.Module:
    return Conv()


def branchy() -> nn.Module:
    return Branchy()


def not_a_module():
    return 42


def bert_classifier() -> nn.Module:
    """A tiny BertForSequenceClassification with random weights (no download): its forward
    returns a Hugging Face ModelOutput, a dict subclass."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(5)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


class TwoOutputs(nn.Module):
    def forward(self, x: torch.Tensor):
        return x * 2, x + 1
