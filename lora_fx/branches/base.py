"""The branch interface every LoRA variant implements (see the package docstring)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import fx, nn

from ..errors import LoraFxError

if TYPE_CHECKING:
    from ..graph.state import SiteRecord


class Factor(nn.Module):
    """A bare trainable matrix exposed as ``.weight`` (PEFT keeps embedding factors this way)."""

    def __init__(self, *shape: int, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape, dtype=dtype, device=device))

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}"


def weight_of(module: nn.Module) -> torch.Tensor:
    """``module.weight`` typed as a tensor (nn.Module attributes are untyped for mypy)."""
    w = module.weight
    assert isinstance(w, torch.Tensor)
    return w


def copy_checked(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    """``dst[...] = src`` after a shape check that names ``what``; a meta ``dst`` is left alone."""
    if dst.shape != src.shape:
        raise LoraFxError(f"{what} has shape {tuple(src.shape)} but the model needs "
                          f"{tuple(dst.shape)}: the adapter belongs to another model")
    if not dst.is_meta:
        with torch.no_grad():
            dst.copy_(src.to(dst.dtype))



def delta_from_factors(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = s · B @ A in fp32 from PEFT's factors A (r, in, …), B (out, r, …), as [out, in]
    (the weight's delta; the unmerged export's op ``lorafx::lora_delta`` is the output's)."""
    return scale * (b.float().flatten(1) @ a.float().flatten(1))

class LoraBranch(nn.Module):
    """Δ(x) = s · B(A(x)) added to one op's output; subclasses fix what A and B are.

    Subclasses set ``lora_A`` / ``lora_B`` (modules whose ``.weight`` is PEFT's tensor) and
    ``scaling``, and implement :meth:`forward` and :meth:`delta_weight`.
    """

    kind: ClassVar[str] = "linear"
    lora_A: nn.Module
    lora_B: nn.Module
    scaling: float
    compute: str = "input"  # LoraConfig.branch_compute: where Δ is computed on mixed dtypes
    peft_name: str = ""  # PEFT's module path for the factors where it is not the site's name
    # (target_parameters: nested ParamWrappers' ``.base_layer`` keys, ``match.parameters``)

    def compute_in(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
        """(x in the dtype Δ is computed in, the dtype Δ is returned in).

        "input": x's own dtype (the factors are cast to it, :meth:`cast`); "adapter" (PEFT's):
        the factors' dtype, Δ cast back to x's. Integer x (ids) is returned as is.
        """
        if self.compute == "adapter" and x.is_floating_point():
            return x.to(weight_of(self.lora_A).dtype), x.dtype
        return x, x.dtype

    @staticmethod
    def cast(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``w`` in ``dtype`` inside the graph (a no-op when equal; gradients flow back in w's
        dtype, so fp32 factors are master weights of a bf16 computation)."""
        return w if w.dtype == dtype else w.to(dtype)

    @property
    def r(self) -> int:
        return int(weight_of(self.lora_A).shape[0])

    def delta_weight(self, layout: str = "out_in") -> torch.Tensor:
        """ΔW in fp32, shaped like the base weight (``layout`` "in_out": transposed)."""
        raise NotImplementedError

    def fold(self, weight: torch.Tensor, layout: str = "out_in", where: str = "") -> torch.Tensor:
        """W + ΔW computed in fp32, cast once to W's dtype; LoraFxError when not finite."""
        delta = self.delta_weight(layout)
        if delta.shape != weight.shape:
            raise LoraFxError(f"merging site {where!r}: ΔW {tuple(delta.shape)} does not fit the "
                              f"weight {tuple(weight.shape)}; the adapter belongs to another model")
        merged = (weight.detach().float() + delta.to(weight.device)).to(weight.dtype)
        if not torch.isfinite(merged).all():  # after the cast: fp16/bf16 overflow counts too
            raise LoraFxError(f"merging site {where!r} gives non-finite weights: the adapter "
                              f"holds inf/nan or W + ΔW overflows {weight.dtype}; check its "
                              "training")
        return merged

    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as PEFT saves them (detached)."""
        return weight_of(self.lora_A).detach(), weight_of(self.lora_B).detach()

    def load_factors(self, a: torch.Tensor, b: torch.Tensor, where: str) -> None:
        """Copy PEFT's (A, B) in, checking shapes (the inverse of :meth:`peft_factors`)."""
        copy_checked(weight_of(self.lora_A), a, f"{where}.lora_A")
        copy_checked(weight_of(self.lora_B), b, f"{where}.lora_B")

    # --- hooks through which variants reach the pipeline (defaults: plain LoRA) -------------
    def on_inject(self, gm: fx.GraphModule, site: SiteRecord, delta: fx.Node) -> bool:
        """Called by the inject step for each of the site's ``delta`` nodes (``lora.<site>(x)``);
        a variant that reads more than x (DoRA: y, W, b) wires it in here. Returns whether the
        graph changed."""
        return False

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors PEFT saves for the site besides A and B, by key suffix (DoRA:
        ``lora_magnitude_vector``), detached."""
        return {}

    def load_extra(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Copy in what :meth:`extra_tensors` saved; an adapter with more is inconsistent."""
        if tensors:
            raise LoraFxError(f"{where}: the adapter has {sorted(tensors)[0]}, which a plain "
                              "LoRA site does not take (use_dora is false in its config): the "
                              "adapter is inconsistent")

    def unmerged_refusal(self, site: str) -> str | None:
        """Why an unmerged ONNX export cannot keep this branch as MatMul adapter inputs, or
        None when it can: Δ(x) must be (x A') B' with A' = Aᵀ, B' = s·Bᵀ."""
        if self.kind != "linear":
            return (f"site {site!r} has a {self.kind} LoRA, which an unmerged ONNX export cannot "
                    "keep as MatMul inputs: export it merged (--merge)")
        return None

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"
