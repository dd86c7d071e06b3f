"""LoRA on a linear op: the whole output (LoraLinear) or slices of a fused one (LoraFused)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LoraFxError
from .base import LoraBranch, copy_checked, delta_from_factors, weight_of


def init_linear_factors(a: torch.Tensor, b: torch.Tensor, r: int, init: bool | str) -> None:
    """PEFT's ``reset_lora_parameters``: A Kaiming-uniform (or N(0, 1/r)), B = 0."""
    if init is False or a.is_meta:
        return
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(a, std=1 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)


def dropout_module(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


class LoraLinear(LoraBranch):
    """Δ(x) = s · B(A(dropout(x))), A: in → r, B: r → out (PEFT's ``lora_A`` / ``lora_B``).

    Merge: ΔW = s · B @ A [out, in] (transposed for an [in, out] weight). With ``init`` True,
    A is Kaiming-uniform (nn.Linear's init) and B = 0, so Δ = 0 at the start; "gaussian"
    draws A ~ N(0, 1/r); False leaves both random (Δ ≠ 0).
    """

    def __init__(self, in_features: int, out_features: int, r: int, scale: float,
                 dropout: float = 0.0, init: bool | str = True,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.lora_A = nn.Linear(in_features, r, bias=False, **kw)  # type: ignore[arg-type]
        self.lora_B = nn.Linear(r, out_features, bias=False, **kw)  # type: ignore[arg-type]
        self.lora_dropout: nn.Module = dropout_module(dropout)
        self.scaling = float(scale)
        self.reset(init)

    def reset(self, init: bool | str) -> None:
        init_linear_factors(weight_of(self.lora_A), weight_of(self.lora_B), self.r, init)

    def delta_weight(self, layout: str = "out_in") -> torch.Tensor:
        """ΔW = s · B @ A in fp32, [out, in] (its transpose for layout "in_out")."""
        delta = delta_from_factors(weight_of(self.lora_A), weight_of(self.lora_B), self.scaling)
        return delta.t() if layout == "in_out" else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, out = self.compute_in(x)
        a, b = self.cast(weight_of(self.lora_A), h.dtype), self.cast(weight_of(self.lora_B),
                                                                       h.dtype)
        delta = F.linear(F.linear(self.lora_dropout(h), a), b) * self.scaling
        return delta.to(out)


class LoraFused(LoraBranch):
    """LoRA on slices of a fused projection (loralib's ``enable_lora``), e.g. q and v of qkv.

    The output [out] splits into ``len(mask)`` equal slices of d = out / len(mask); the k
    slices with ``mask[i]`` True get their own rank-r pair (A_j, B_j), the others nothing:
    Δ(x)[slice_i] = s · B_j A_j dropout(x), 0 for a disabled slice. Stored stacked:
    ``lora_A.weight`` = [A_1; …; A_k] (k·r, in), ``lora_B.weight`` = [B_1; …; B_k] (k·d, r).
    Merge: rows of slice i of ΔW [out, in] are s · B_j @ A_j, other rows 0.

    PEFT has no fused form; :meth:`peft_factors` writes the exactly equivalent plain LoRA of
    rank k·r: A = [A_1; …; A_k], B block-diagonal (zero outside each slice's rows × rank
    columns), so s · B @ A is the same ΔW (PEFT needs rank_pattern k·r and alpha scaled to
    keep s; see ``lora_fx.api.to_adapter``).
    """

    def __init__(self, in_features: int, out_features: int, r: int, scale: float,
                 mask: list[bool], dropout: float = 0.0, init: bool | str = True,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        self.mask = [bool(m) for m in mask]
        self.slice = out_features // len(self.mask)
        self.k = sum(self.mask)
        self.rank = r
        kw = {"dtype": dtype, "device": device}
        self.lora_A = nn.Linear(in_features, self.k * r, bias=False, **kw)  # type: ignore
        self.lora_B = nn.Linear(r, self.k * self.slice, bias=False, **kw)  # type: ignore
        self.lora_dropout: nn.Module = dropout_module(dropout)
        self.scaling = float(scale)
        self.out_features = out_features
        init_linear_factors(weight_of(self.lora_A), weight_of(self.lora_B), r, init)

    @property
    def r(self) -> int:
        return self.rank

    def _pieces(self) -> list[torch.Tensor | None]:
        """B_j of each enabled slice in order, None for a disabled slice."""
        blocks = iter(weight_of(self.lora_B).split(self.slice, dim=0))
        return [next(blocks) if on else None for on in self.mask]

    def delta_weight(self, layout: str = "out_in") -> torch.Tensor:
        a = weight_of(self.lora_A).float().split(self.rank, dim=0)
        rows, j = [], 0
        for b in self._pieces():
            if b is None:
                rows.append(a[0].new_zeros(self.slice, a[0].shape[1]))
            else:
                rows.append(self.scaling * (b.float() @ a[j]))
                j += 1
        delta = torch.cat(rows, dim=0)
        return delta.t() if layout == "in_out" else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, out = self.compute_in(x)
        a = self.cast(weight_of(self.lora_A), x.dtype)
        h = F.linear(self.lora_dropout(x), a).split(self.rank, dim=-1)
        outs, j = [], 0
        for b in self._pieces():
            if b is None:
                outs.append(h[0].new_zeros(*h[0].shape[:-1], self.slice))
            else:
                outs.append(h[j] @ self.cast(b, x.dtype).t())
                j += 1
        return (torch.cat(outs, dim=-1) * self.scaling).to(out)

    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (k·r, in), B (out, k·r)) with B block-diagonal: PEFT's equivalent plain LoRA."""
        a = weight_of(self.lora_A).detach()
        b_full = a.new_zeros(self.out_features, self.k * self.rank)
        j = 0
        for i, b in enumerate(self._pieces()):
            if b is not None:
                rows = slice(i * self.slice, (i + 1) * self.slice)
                b_full[rows, j * self.rank:(j + 1) * self.rank] = b.detach()
                j += 1
        return a, b_full

    def load_factors(self, a: torch.Tensor, b: torch.Tensor, where: str) -> None:
        """Split the block form back; refuse a B with weights outside its slice blocks."""
        copy_checked(weight_of(self.lora_A), a, f"{where}.lora_A")
        expected = (self.out_features, self.k * self.rank)
        if tuple(b.shape) != expected:
            raise LoraFxError(f"{where}.lora_B has shape {tuple(b.shape)} but the fused site "
                              f"needs {expected}: the adapter belongs to another model")
        blocks, j, outside = [], 0, b.clone()
        for i, on in enumerate(self.mask):
            if on:
                rows = slice(i * self.slice, (i + 1) * self.slice)
                cols = slice(j * self.rank, (j + 1) * self.rank)
                blocks.append(b[rows, cols])
                outside[rows, cols] = 0
                j += 1
        if outside.abs().max() > 0:
            raise LoraFxError(f"{where}.lora_B has weights outside its slices {self.mask}: it "
                              "was trained as a plain LoRA; load it without enable_lora")
        copy_checked(weight_of(self.lora_B), torch.cat(blocks, dim=0), f"{where}.lora_B")

    def extra_repr(self) -> str:
        return f"r={self.rank}, mask={self.mask}, scaling={self.scaling:g}"
