"""Inits that read the base weight: PiSSA and OLoRA (PEFT's ``init_lora_weights`` = "pissa" /
"olora").

For a site with W [out, in] (Wᵀ for an [in, out] weight), rank r and scale s:

- PiSSA (Meng et al. 2024): W = U S Vᵀ, A₀ = sqrt(S_r / s) V_rᵀ, B₀ = U_r sqrt(S_r / s), so that
  s·B₀A₀ = U_r S_r V_rᵀ, the top-r part of W.
- OLoRA (Büyükakyüz 2024): W = Q R (reduced QR), B₀ = Q[:, :r], A₀ = R[:r].

Both then replace the base weight by the residual W_res = W − s·B₀A₀, so the model is unchanged
at init (W_res + s·B₀A₀ = W); trained A, B act on W_res and merge as W' = W_res + s·B A. The
residual lives in the GraphModule only (copy-on-write): the user's model is never modified.

An adapter saved with such an init (PEFT's "raw" save) keeps ``init_lora_weights`` = "pissa"
/ "olora": loading it onto the *original* base recomputes W_res from W (the init is
deterministic) before the trained A, B are copied in, exactly as PEFT's ``from_pretrained``
does. :func:`to_plain_lora` is PEFT's conversion (``save_pretrained(...,
path_initial_model_for_weight_conversion=...)``): a plain LoRA for the original W with
ΔW = s·B A − s·B₀A₀ = s'·[B | −B₀]·[A ; A₀], rank 2r and alpha doubled (s' = s).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from ..adapter.peft import Factors
from ..branches.base import weight_of
from ..branches.linear import LoraLinear
from ..errors import LoraFxError
from ..graph.attrs import set_attr_cow
from ..graph.state import get_state

WEIGHT_INITS = ("pissa", "olora")


INIT_KEY = "lorafx_init"  # gm.meta[INIT_KEY]: {site: (A₀, B₀)} of the weight-reading init


def reads_weight(init: Any) -> bool:
    """True for an ``init_lora_weights`` value that derives A₀, B₀ from the base weight."""
    return isinstance(init, str) and init in WEIGHT_INITS


def pissa_factors(weight: torch.Tensor, r: int, scale: float) -> Factors:
    """(A₀, B₀) with s·B₀A₀ = U_r S_r V_rᵀ for W = U S Vᵀ [out, in]; fp32 like PEFT."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = (s[:r] / scale).sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root


def olora_factors(weight: torch.Tensor, r: int) -> Factors:
    """(A₀, B₀) = (R[:r], Q[:, :r]) for the reduced QR W = Q R [out, in]; fp32 like PEFT."""
    q, upper = torch.linalg.qr(weight.float())
    return upper[:r], q[:, :r]


def _site_init(init: str, w: torch.Tensor, r: int, scale: float, site: str) -> Factors:
    if r > min(w.shape):
        raise LoraFxError(f"site {site!r}: {init} needs r <= min(out, in) = {min(w.shape)}, got "
                          f"r={r}; lower r (or rank_pattern for this site)")
    return pissa_factors(w, r, scale) if init == "pissa" else olora_factors(w, r)


def init_from_weights(gm: fx.GraphModule) -> int:
    """Apply the config's PiSSA / OLoRA init to every site of an injected ``gm``.

    Sets A = A₀, B = B₀ and replaces each base weight (in ``gm`` only) by W − s·B₀A₀. A no-op
    (returns 0) for any other ``init_lora_weights``, for a module without LoRA state and for
    weights on the meta device. Returns the number of sites initialized.
    """
    state = get_state(gm)
    if state is None or not reads_weight(state.config.init_lora_weights):
        return 0
    init = str(state.config.init_lora_weights)
    factors: dict[str, Factors] = {}
    for name, rec in state.sites.items():
        weight = gm.get_parameter(rec.weight)
        if weight.is_meta:
            continue
        branch = gm.get_submodule(rec.branch)
        if not isinstance(branch, LoraLinear):
            raise LoraFxError(f"site {name!r}: init_lora_weights={init!r} applies to linear "
                              f"sites only, not to a {type(branch).__name__}: leave this site "
                              "out of target_modules or use init_lora_weights=true")
        a_param, b_param = weight_of(branch.lora_A), weight_of(branch.lora_B)
        w = (weight.T if rec.layout == "in_out" else weight).detach().float()
        scale = state.config.scale_for(name)
        a0, b0 = _site_init(init, w, a_param.shape[0], scale, name)
        residual = w - scale * (b0 @ a0)
        if not torch.isfinite(residual).all():
            raise LoraFxError(f"site {name!r}: the {init} residual is not finite: the base "
                              "weight holds inf/nan")
        with torch.no_grad():
            a_param.copy_(a0)
            b_param.copy_(b0)
        new = (residual.T if rec.layout == "in_out" else residual).to(weight.dtype).contiguous()
        set_attr_cow(gm, rec.weight, nn.Parameter(new, requires_grad=False))
        factors[name] = (a0.to(a_param.dtype), b0.to(b_param.dtype))
    gm.meta[INIT_KEY] = factors
    return len(factors)

