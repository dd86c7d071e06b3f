"""LoRA on a stack of experts W [E, d1, d2]: PEFT's ``target_parameters`` layout and math."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import LoraFxError
from ..grouped_mm import grouped_mm
from .base import LoraBranch, copy_checked, weight_of
from .linear import dropout_module, init_linear_factors


class LoraExperts(LoraBranch):
    """ΔW_e = s · B_e A_e (or its PEFT transpose) for each expert e of W [E, d1, d2].

    Factors as PEFT's ``ParamWrapper`` keeps them: A [r·E, a_in], B [b_out, r·E], with
    A_e = A.view(E, r, a_in)[e] (blocks of r rows) and B_e = B.view(b_out, r, E)[:, :, e]
    (columns e, E + e, 2E + e, ...: interleaved). PEFT orients them by the owning module's
    ``is_transposed``: W [E, out, in] (Mixtral's gate_up_proj [E, 2I, H], down_proj [E, H, I]):
    a_in = d2, b_out = d1, ΔW_e = s · B_e @ A_e; W [E, in, out] (``is_transposed``, GPT-OSS):
    a_in = d1, b_out = d2, ΔW_e = s · A_eᵀ @ B_eᵀ. s = alpha / r (or alpha / sqrt(r)) with r
    the per-expert rank.

    Δ of one use (an op reading W[e] or W[ids], ``match.experts``) from the factors of the
    selected experts only, never the [E, d1, d2] ΔW: for rows x [..., k],
    Δ = s · (x P1_e) P2_e with (P1_e, P2_e) = (A_eᵀ, B_eᵀ) where x contracts with the dim that A
    reads (``a_first``), else (B_e, A_e). Per-row ids gather P1[ids] [S, k, r] and
    P2[ids] [S, r, m]; rows sorted into expert blocks (``grouped_mm``) multiply each block by its
    expert's factors once (``lorafx::grouped_mm``, never a per-row copy of the factors). A
    weight on the left (``bmm(W[ids], x)``, x [S, k, n] as columns) is the same on xᵀ,
    transposed back.
    Merge: W' = W + s · einsum(B, A) per expert in fp32, cast once (``LoraBranch.fold``).
    """

    kind = "experts"

    def __init__(self, experts: int, d1: int, d2: int, r: int, scale: float,
                 peft_transposed: bool = False, layout: str = "out_in", dropout: float = 0.0,
                 init: bool | str = True, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.experts, self.rank, self.shape = experts, r, (experts, d1, d2)
        self.peft_transposed = peft_transposed
        a_in, b_out = (d1, d2) if peft_transposed else (d2, d1)
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.lora_A = nn.Linear(a_in, r * experts, bias=False, **kw)
        self.lora_B = nn.Linear(r * experts, b_out, bias=False, **kw)
        self.lora_dropout: nn.Module = dropout_module(dropout)
        self.scaling = float(scale)
        # the activation meets A first where it contracts with A's dim: d2 for "out_in"
        self.a_first = (layout == "out_in") != peft_transposed
        init_linear_factors(weight_of(self.lora_A), weight_of(self.lora_B), r, init)

    @property
    def r(self) -> int:
        return self.rank

    def _stacks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A3 [E, r, a_in], B3 [E, b_out, r]): expert e's A_e and B_e, views of the factors."""
        a, b = weight_of(self.lora_A), weight_of(self.lora_B)
        a3 = a.view(self.experts, self.rank, a.shape[1])
        b3 = b.view(b.shape[0], self.rank, self.experts).permute(2, 0, 1)
        return a3, b3

    def forward(self, x: torch.Tensor, index: Any, how: str = "rows") -> torch.Tensor:
        """Δ for the op's output. ``how``: "rows": x [..., k], ``index`` the expert id or the
        ids [S] of the rows (x [S, n, k]); "columns": x [S, k, n] (``bmm(W[ids], x)``);
        "offsets": x [S, k] sorted by expert, ``index`` the row blocks' ends (``grouped_mm``)."""
        h, out = self.compute_in(x)
        h = self.lora_dropout(h.transpose(-1, -2) if how == "columns" else h)
        a3, b3 = self._stacks()
        a3, b3 = self.cast(a3, h.dtype), self.cast(b3, h.dtype)
        p1, p2 = (a3.transpose(1, 2), b3.transpose(1, 2)) if self.a_first else (b3, a3)
        if how == "offsets":
            delta = grouped_mm(grouped_mm(h, p1, index), p2, index) * self.scaling
        else:
            delta = (h @ p1[index]) @ p2[index] * self.scaling
        return (delta.transpose(-1, -2) if how == "columns" else delta).to(out)

    def delta_weight(self, layout: str = "out_in") -> torch.Tensor:
        """ΔW [E, d1, d2] in fp32, in the parameter's own layout (``layout`` is the op's and
        does not change it): PEFT's ``get_delta_weight``."""
        a3, b3 = self._stacks()
        delta = torch.einsum("eor,eri->eoi", b3.float(), a3.float()) * self.scaling
        return delta.transpose(1, 2) if self.peft_transposed else delta

    def load_factors(self, a: torch.Tensor, b: torch.Tensor, where: str) -> None:
        """PEFT's (A, B) in, refusing an adapter made for another expert count or size."""
        want_a, want_b = tuple(weight_of(self.lora_A).shape), tuple(weight_of(self.lora_B).shape)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            got = a.shape[0] // self.rank if a.dim() == 2 and a.shape[0] % self.rank == 0 else "?"
            raise LoraFxError(
                f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the "
                f"model's {self.experts} experts of {list(self.shape[1:])} at rank {self.rank} "
                f"(lora_A {want_a}, lora_B {want_b}; the adapter's lora_A holds {got} experts): "
                "the adapter was made for another model")
        copy_checked(weight_of(self.lora_A), a, f"{where}.lora_A")
        copy_checked(weight_of(self.lora_B), b, f"{where}.lora_B")

    def unmerged_refusal(self, site: str) -> str | None:
        return (f"site {site!r} is a stack of {self.experts} experts, whose LoRA an unmerged "
                "ONNX export cannot keep as MatMul adapter inputs yet: export it merged (--merge)")

    def extra_repr(self) -> str:
        return f"r={self.rank}, experts={self.experts}, scaling={self.scaling:g}"
