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
