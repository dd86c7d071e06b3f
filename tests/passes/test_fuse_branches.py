"""lora_fx.passes.fuse_branches: the fused op is y + s·(x Aᵀ) Bᵀ (fused graphs end to end:
tests/train/test_fast.py)."""

from __future__ import annotations

import torch

from lora_fx.passes.fuse_branches import lora_addmm


def test_lora_addmm_is_y_plus_scaled_product() -> None:
    g = torch.Generator().manual_seed(0)
    y, xa, b = (torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 4, generator=g),
                torch.randn(5, 4, generator=g))
    torch.testing.assert_close(lora_addmm(y, xa, b, 0.5), y + 0.5 * (xa @ b.t()))

