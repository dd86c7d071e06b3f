"""A small functional MLP: every linear form lorafx matches, no nn.Linear needed.

Usage: ``lorafx inspect examples/tiny/model.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class TinyMLP(nn.Module):
    """x → F.linear(w_in) → gelu → x @ w_mid.t() → gelu → x @ w_up → nn.Linear head."""

    def __init__(self, d: int = 32, hidden: int = 64, classes: int = 4) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(hidden, d) / d**0.5)
        self.b_in = nn.Parameter(torch.zeros(hidden))
        self.w_mid = nn.Parameter(torch.randn(hidden, hidden) / hidden**0.5)
        self.w_up = nn.Parameter(torch.randn(hidden, d) / hidden**0.5)  # [in, out]
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(F.linear(x, self.w_in, self.b_in))
        h = F.gelu(h @ self.w_mid.t())
        h = torch.matmul(h, self.w_up)
        return self.head(h)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyMLP()


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(8, 32, generator=torch.Generator().manual_seed(1)),)


def _batches(seed: int, n: int) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(32, 4, generator=torch.Generator().manual_seed(42))
    for _ in range(n):
        x = torch.randn(16, 32, generator=g)
        yield (x,), (x @ proj).argmax(-1)


def train_batches() -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    return _batches(2, 10_000)


def eval_batches() -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    return _batches(3, 8)


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target)
