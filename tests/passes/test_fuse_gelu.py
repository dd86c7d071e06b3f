"""lora_fx.passes.fuse_gelu: tanh GELU written out (HF's NewGELUActivation) becomes one
aten.gelu(approximate="tanh"), and nothing else does."""

from __future__ import annotations

from typing import Any

import torch

from lora_fx.passes.fuse_gelu import fuse_gelu_pass
from tests.helpers import count_calls


def _gelu_reference(x: torch.Tensor) -> torch.Tensor:
    """tanh GELU written out by hand (the formula HF's NewGELUActivation uses)."""
    return 0.5 * x * (1.0 + torch.tanh((2.0 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3)))


def test_fuse_gelu_pass_matches_only_the_formula() -> None:
    class Acts(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> Any:
            a = _gelu_reference(x)                                        # fused
            b = 0.5 * x * (1.0 + torch.tanh(0.79788456 * (x + 0.04 * x ** 3)))  # other const
            inner = torch.tanh((2.0 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3))
            c = 0.5 * x * (1.0 + inner)                                   # tanh reused below
            return a, b, c, inner

    x = torch.randn(4, 6)
    gm = torch.export.export(Acts(), (x,)).module()
    want = gm(x)
    fused = fuse_gelu_pass(gm)
    gm.recompile()
    assert fused.counts["fused_gelu"] == 1 and count_calls(gm, "aten.gelu") == 1
    for got, ref in zip(gm(x), want, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gm(x)[0], torch.nn.functional.gelu(x, approximate="tanh"))

