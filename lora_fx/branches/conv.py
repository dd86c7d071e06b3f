"""LoRA on a convolution, in PEFT's layout."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import LoraBranch, weight_of
from .linear import dropout_module, init_linear_factors

CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class LoraConv(LoraBranch):
    """Δ(x) = s · B(A(dropout(x))) for y = conv(x, W), W [out, in, *k] (groups = 1).

    A is a conv with the base kernel, stride, padding, dilation and padding mode into r
    channels (``lora_A.weight`` [r, in, *k]); B a 1×1 conv r → out (``lora_B.weight``
    [out, r, 1…]). Convolution is linear in the kernel and a 1×1 conv mixes channels only, so
    B(A(x)) = conv(x, B·A) with (B·A)[o, i, *k] = Σ_j B[o, j] A[j, i, *k]: the merge is
    W' = W + s · (B.flatten(1) @ A.flatten(1)).reshape(W.shape), as PEFT's.
    """

    kind = "conv"

    def __init__(self, in_features: int, out_features: int, r: int, scale: float,
                 geometry: dict[str, Any], dropout: float = 0.0, init: bool | str = True,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        conv = CONVS[int(geometry["dims"])]
        kw: dict[str, Any] = {"bias": False, "dtype": dtype, "device": device}
        self.lora_A = conv(in_features, r, geometry["kernel_size"], stride=geometry["stride"],
                           padding=geometry["padding"], dilation=geometry["dilation"],
                           padding_mode=geometry.get("padding_mode", "zeros"), **kw)
        self.lora_B = conv(r, out_features, 1, **kw)
        self.lora_dropout: nn.Module = dropout_module(dropout)
        self.scaling = float(scale)
        init_linear_factors(weight_of(self.lora_A), weight_of(self.lora_B), r, init)

    def delta_weight(self, layout: str = "out_in") -> torch.Tensor:
        """ΔW = s · (B [out, r] @ A [r, in·∏k]) reshaped to [out, in, *k], fp32."""
        a, b = weight_of(self.lora_A).float(), weight_of(self.lora_B).float()
        delta = self.scaling * (b.flatten(1) @ a.flatten(1))
        return delta.reshape(b.shape[0], *a.shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, out = self.compute_in(x)
        h = self.lora_dropout(h)
        for conv in (self.lora_A, self.lora_B):
            assert isinstance(conv, nn.modules.conv._ConvNd)
            h = conv._conv_forward(h, self.cast(conv.weight, h.dtype), None)  # type: ignore
        return (h * self.scaling).to(out)
