"""DoRA (Liu et al. 2024): weight-decomposed LoRA, in PEFT's math and format.

For a linear site y = x Wᵀ + b, W [out, in] (Wᵀ stored for an [in, out] weight), rank-r
factors A, B, scale s and a trainable magnitude m [out] (PEFT's ``lora_magnitude_vector``):

    V = W + s·B A,   g = m / ‖V‖_r   (‖·‖_r: the L2 norm of each output row, PEFT's
                                      ``weight_norm``; detached from the gradient, as DoRA's §4.3)
    y' = g ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b  =  x (g ⊙ V)ᵀ + b     (bias unscaled)

At init m = ‖W + s·B A‖_r, so g = 1 and y' = y. The branch is still added to the op's output:
Δ = y' − y = (g − 1) ⊙ (y − b) + g ⊙ s·B A x, so its graph node reads the op output y, the
weight W and the bias b besides x (``dora_pass`` wires them; the ``get_attr`` nodes it adds are
tagged and erased by merge). With dropout in training, PEFT computes the base part on the
dropped input instead, (g − 1) ⊙ F.linear(dropout(x), W) + g ⊙ s·B A dropout(x); so does this.

Merge folds it exactly: W' = g ⊙ (W + s·B A) (rows), bias unchanged. Saved as PEFT saves it:
``base_model.model.<site>.lora_magnitude_vector`` [out] beside ``lora_A`` / ``lora_B``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..branches.base import copy_checked, weight_of
from ..branches.linear import LoraLinear
from ..config import LoraConfig
from ..errors import LoraFxError
from ..graph.state import NODE_KEY, SiteRecord
from ..match.matcher import Site

FORMS = ("nn.Linear", "F.linear", "addmm", "matmul")  # linear forms whose bias DoRA can find


class DoraLinear(LoraLinear):
    """LoRA plus DoRA's magnitude (see the module docstring for the math).

    ``forward(x, y, weight, bias)`` returns Δ = y' − y; ``layout`` is the stored weight's
    ("in_out": [in, out], transposed before use).
    """

    def __init__(self, in_features: int, out_features: int, r: int, scale: float,
                 dropout: float = 0.0, init: bool | str = True, layout: str = "out_in",
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__(in_features, out_features, r, scale, dropout, init, dtype, device)
        self.layout = layout
        self.lora_magnitude_vector = nn.Parameter(
            torch.ones(out_features, dtype=dtype, device=device))

    def _out_in(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t() if self.layout == "in_out" else weight

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """‖W + s·B A‖ per output row, detached (PEFT's ``get_weight_norm``), in W's dtype."""
        lora = weight_of(self.lora_B) @ weight_of(self.lora_A)
        v = self._out_in(weight) + self.scaling * lora.detach().to(weight.dtype)
        return torch.linalg.norm(v, dim=1).to(weight.dtype).detach()

    def reset_magnitude(self, weight: torch.Tensor) -> None:
        """m = ‖W + s·B A‖_r, so that the site computes y' = y."""
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self.weight_norm(weight.float()))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None,  # type: ignore[override]
                weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        if y is None or weight is None:
            raise LoraFxError("a DoRA branch needs the op output and weight: inject it with "
                              "lora_fx.inject(config with use_dora=True)")
        if self.compute == "adapter" and x.dtype != weight_of(self.lora_A).dtype:
            dt = weight_of(self.lora_A).dtype  # PEFT's: all in the factors' dtype, Δ cast back
            return self._delta(x.to(dt), y.to(dt), weight.to(dt),
                               bias.to(dt) if bias is not None else None).to(x.dtype)
        return self._delta(x, y, weight, bias)

    def _delta(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
        """Δ = (g − 1) ⊙ base + g ⊙ s·B A x, computed in x's dtype."""
        w = weight.to(x.dtype)
        g = self.cast(self.lora_magnitude_vector, x.dtype) / self.weight_norm(w)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base = y - bias if bias is not None else y
        else:
            x = self.lora_dropout(x)
            base = F.linear(x, self._out_in(w))
        a, b = self.cast(weight_of(self.lora_A), x.dtype), self.cast(weight_of(self.lora_B),
                                                                       x.dtype)
        lora = F.linear(F.linear(x, a), b)
        return (g - 1) * base + g * lora * self.scaling

    def fold(self, weight: torch.Tensor, layout: str = "out_in", where: str = "") -> torch.Tensor:
        """W' = g ⊙ (W + s·B A) with g = m / ‖W + s·B A‖_r, fp32, cast once; refused when not
        finite (e.g. a row whose norm is 0)."""
        w = self._out_in(weight.detach().float())
        v = w + self.delta_weight("out_in").to(w.device)
        merged = (self.lora_magnitude_vector.detach().float() / torch.linalg.norm(v, dim=1)
                  )[:, None] * v
        if not torch.isfinite(merged).all():
            raise LoraFxError(f"merging DoRA site {where!r} gives non-finite weights: a row of "
                              "W + s·B@A has norm 0 or the adapter holds inf/nan")
        return self._out_in(merged).to(weight.dtype).contiguous()

    def on_inject(self, gm: fx.GraphModule, site: SiteRecord, delta: fx.Node) -> bool:
        """Rewire ``lora.<site>(x)`` to ``lora.<site>(x, y, W, b)`` and set m = ‖W + s·B A‖_r
        (weights on the meta device keep m = 1)."""
        add = next(u for u in delta.users if (u.meta.get(NODE_KEY) or {}).get("role") == "add")
        op = add.args[0]
        assert isinstance(op, fx.Node)
        bias, new_bias = _bias(gm, op, site.form, site.name)
        with gm.graph.inserting_before(delta):
            w = gm.graph.get_attr(site.weight)
            w.meta[NODE_KEY] = {"site": site.name, "role": "base"}
            if new_bias:
                bias = gm.graph.get_attr(bias)
                bias.meta[NODE_KEY] = {"site": site.name, "role": "base"}
        delta.args = (delta.args[0], op, w, bias)
        weight = gm.get_parameter(site.weight)
        if not weight.is_meta:
            self.reset_magnitude(weight)
        return True

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_magnitude_vector": self.lora_magnitude_vector.detach()}

    def load_extra(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        if set(tensors) != {"lora_magnitude_vector"}:
            raise LoraFxError(f"{where}: a DoRA site needs exactly lora_magnitude_vector in the "
                              f"adapter, found {sorted(tensors) or 'none'}: the adapter is "
                              "inconsistent")
        copy_checked(self.lora_magnitude_vector, tensors["lora_magnitude_vector"],
                     f"{where}.lora_magnitude_vector")

    def unmerged_refusal(self, site: str) -> str | None:
        return (f"site {site!r} is a DoRA site, whose output rescaling an unmerged ONNX export "
                "cannot keep as adapter inputs: export it merged (--merge)")

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


def dora_branch(site: Site, config: LoraConfig, dtype: torch.dtype,
                device: torch.device) -> DoraLinear:
    """The DoRA branch for ``site`` (``use_dora``); linear forms only, as a one-line dispatch
    from the inject pass's ``build_branch``."""
    if site.kind != "linear" or site.form not in FORMS or config.slices_for(site.name):
        raise LoraFxError(f"site {site.name!r} ({site.form}): lorafx supports DoRA on linear "
                          f"ops ({', '.join(FORMS)}) only; leave it out of target_modules")
    if site.shared:
        raise LoraFxError(f"site {site.name!r}: its weight is shared with {site.shared[0]!r}; "
                          "DoRA rescales the whole weight, so it cannot target a tied weight")
    return DoraLinear(site.in_features, site.out_features, config.rank_for(site.name),
                      config.scale_for(site.name), config.lora_dropout, config.init_lora_weights,
                      site.layout, dtype=dtype, device=device)


def _bias(gm: fx.GraphModule, op: fx.Node, form: str, site: str) -> tuple[Any, bool]:
    """(the bias the op adds, True when it is a new get_attr node to insert and tag)."""
    if form == "nn.Linear":
        return (f"{op.target}.bias", True) if gm.get_submodule(str(op.target)).bias is not None \
            else (None, False)
    if form == "F.linear":
        return (op.args[2] if len(op.args) > 2 else op.kwargs.get("bias")), False
    if form == "addmm":
        if op.kwargs.get("beta", 1) != 1 or op.kwargs.get("alpha", 1) != 1:
            raise LoraFxError(f"site {site!r}: addmm with beta/alpha != 1 cannot take DoRA")
        return op.args[0], False
    return None, False



