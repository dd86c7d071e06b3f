"""The low-rank branch modules that the inject pass calls from the graph."""

from __future__ import annotations

import math

import torch
from torch import nn


class LoraLinear(nn.Module):
    """Δ(x) = s · B(A(dropout(x))), A: in → r, B: r → out (PEFT's ``lora_A`` / ``lora_B``).

    With ``init`` True, A is Kaiming-uniform (nn.Linear's init) and B = 0, so Δ = 0 at the
    start; "gaussian" draws A ~ N(0, 1/r); False leaves both random (Δ ≠ 0).
    """

    def __init__(self, in_features: int, out_features: int, r: int, scale: float,
                 dropout: float = 0.0, init: bool | str = True,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.lora_A = nn.Linear(in_features, r, bias=False, **kw)  # type: ignore[arg-type]
        self.lora_B = nn.Linear(r, out_features, bias=False, **kw)  # type: ignore[arg-type]
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = float(scale)
        self.reset(init)

    def reset(self, init: bool | str) -> None:
        """PEFT's ``reset_lora_parameters`` for plain LoRA."""
        if init is False or self.lora_A.weight.is_meta:
            return
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / self.lora_A.out_features)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    @property
    def r(self) -> int:
        return self.lora_A.out_features

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B @ A in fp32, shaped [out, in]."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"
