"""Adapter surgery: SVD truncation (``resize``) and weighted combination (``combine``).

Both work on ΔW = s · B @ A per site and write the result back as factors for a new config
with r = the largest site rank, ``lora_alpha = r``, ``use_rslora = False`` and no
``alpha_pattern``; a site of smaller rank k gets a ``rank_pattern`` entry (its name, regex-
escaped, anchored with ``^`` only when it would also match another site as a suffix). Whatever
the new scale s' = alpha / k of a site, its factors are divided by sqrt(s') so that
s' · B' @ A' is exactly the intended ΔW'.

From a thin SVD ΔW' = U S Vᵀ the factors are balanced: B' = U sqrt(S / s'), A' = sqrt(S / s') Vᵀ.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from ..config import LoraConfig
from ..errors import LoraFxError
from .analysis import AdapterLike, as_adapter, check_finite, factors, lowrank_svd
from .peft import Adapter, Factors

METHODS = ("linear", "cat", "svd")


def _pattern_key(site: str, sites: Sequence[str]) -> str:
    """A rank_pattern key that matches ``site`` and no other site.

    Keys match as ``(.*\\.)?(key)$``, so a plain key also hits every site ending in ``.site``.
    """
    clash = any(other != site and other.endswith("." + site) for other in sites)
    return ("^" if clash else "") + re.escape(site)


def _ranked_config(base: LoraConfig, ranks: dict[str, int], **changes: Any) -> LoraConfig:
    """``base`` with r = max rank, lora_alpha = r, rsLoRA off and one rank_pattern per odd site."""
    r = max(ranks.values())
    pattern = {_pattern_key(s, list(ranks)): k for s, k in sorted(ranks.items()) if k != r}
    config = dataclasses.replace(base, r=r, lora_alpha=r, use_rslora=False, rank_pattern=pattern,
                                 alpha_pattern={}, **changes)
    wrong = [s for s, k in ranks.items() if config.rank_for(s) != k]
    if wrong:  # a pattern of base's matching oddly would be a bug here, never the user's input
        raise AssertionError(f"rank_pattern {pattern} gives site {wrong[0]!r} the wrong rank")
    return config


def _rebuild(config: LoraConfig, parts: dict[str, Factors], like: dict[str, Factors],
             saved: dict[str, torch.Tensor]) -> Adapter:
    """An Adapter whose s'·B'@A' equals the float64 B@A of ``parts`` (s' from ``config``).

    ``like`` gives each site's original (A, B), whose dtype and trailing (conv) dims are kept.
    """
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for site, (a, b) in parts.items():
        root = math.sqrt(config.scale_for(site))
        a0, b0 = like[site]
        k = a.shape[0]
        new_a = (a / root).reshape(k, *a0.shape[1:]).to(a0.dtype).contiguous()
        new_b = (b / root).reshape(b0.shape[0], k, *b0.shape[2:]).to(b0.dtype).contiguous()
        lora[site] = (new_a, new_b)
    return Adapter(config, lora, dict(saved))


def _truncate(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[Factors, float]:
    """Best rank-k approximation of B @ A (Eckart-Young), k = min(rank, its SVD's length).

    Returns the balanced factors (sqrt(S_k) V_kᵀ, U_k sqrt(S_k)) and the energy kept,
    Σ_{i<=k} σ_i² / Σ_i σ_i² (1.0 when B @ A = 0).
    """
    u, s, vh = lowrank_svd(b, a)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    total = float(s.square().sum())
    kept = float(s[:k].square().sum()) / total if total > 0.0 else 1.0
    return (root[:, None] * vh[:k], u[:, :k] * root), kept


def _refuse_dora(adapters: Sequence[Adapter]) -> None:
    """SVD surgery on ΔW would drop DoRA's magnitude vector: refuse rather than lose it."""
    if any(a.magnitude for a in adapters):
        raise LoraFxError("DoRA adapters (lora_magnitude_vector) cannot be resized or combined "
                          "by SVD: the magnitude would be lost; merge the adapter instead")


def resize(adapter: Adapter, rank: int) -> tuple[Adapter, dict[str, float]]:
    """Truncate every site's ΔW to rank ``rank`` by SVD: ΔW ≈ U_k S_k V_kᵀ (the best rank-k
    approximation in Frobenius norm), with ‖ΔW - ΔW'‖²_F = Σ_{i>k} σ_i².

    A site whose ΔW has fewer than ``rank`` singular values (min(r_site, out, in)) keeps all of
    them, exactly, and gets a ``rank_pattern`` entry. Returns the new adapter (same sites,
    target_modules, dtype and modules_to_save tensors) and, per site, the energy kept
    Σ_{i<=k} σ_i² / Σ_i σ_i².
    """
    if not isinstance(rank, int) or rank < 1:
        raise LoraFxError(f"rank={rank!r} must be an integer >= 1")
    if not adapter.lora:
        raise LoraFxError("the adapter has no LoRA site: nothing to resize")
    _refuse_dora([adapter])
    parts: dict[str, Factors] = {}
    kept: dict[str, float] = {}
    for site in sorted(adapter.lora):
        parts[site], kept[site] = _truncate(*factors(adapter, site), rank)
    config = _ranked_config(adapter.config, {s: a.shape[0] for s, (a, _) in parts.items()})
    return _rebuild(config, parts, adapter.lora, adapter.saved), kept


def _site_inputs(adapters: Sequence[Adapter], weights: Sequence[float], site: str
                 ) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(A_i, B_i, w_i · s_i) as float64 2-D matrices for each adapter that has ``site``."""
    out = []
    for adapter, weight in zip(adapters, weights, strict=True):
        if site in adapter.lora:
            a, b = check_finite(adapter, site)
            out.append((a.detach().double().flatten(1), b.detach().double().flatten(1),
                        float(weight) * adapter.config.scale_for(site)))
    shapes = {(b.shape[0], a.shape[1]) for a, b, _ in out}
    if len(shapes) > 1:
        raise LoraFxError(f"site {site!r} has ΔW shapes {sorted(shapes)} in different adapters: "
                          "combine adapters trained on the same model")
    return out


def _linear(site: str, items: list[tuple[torch.Tensor, torch.Tensor, float]]) -> Factors:
    """PEFT's "linear": A = Σ sign(c_i) sqrt|c_i| A_i, B = Σ sqrt|c_i| B_i with c_i = w_i s_i.

    B @ A = Σ_i c_i B_i A_i + Σ_{i≠j} (cross terms): exact for one adapter, else an
    approximation (PEFT's own warning); it needs every adapter at the same rank.
    """
    ranks = sorted({a.shape[0] for a, _, _ in items})
    if len(ranks) > 1:
        raise LoraFxError(f"site {site!r} has ranks {ranks} in different adapters: method "
                          "'linear' needs equal ranks; use method 'cat' or 'svd'")
    a = sum((math.copysign(math.sqrt(abs(c)), c) * a_i for a_i, _, c in items),
            torch.zeros_like(items[0][0]))
    b = sum((math.sqrt(abs(c)) * b_i for _, b_i, c in items), torch.zeros_like(items[0][1]))
    return a, b


def _cat(items: list[tuple[torch.Tensor, torch.Tensor, float]]) -> Factors:
    """PEFT's "cat": A = [c_1 A_1; c_2 A_2; ...], B = [B_1, B_2, ...], so that
    B @ A = Σ_i c_i B_i A_i = Σ_i w_i ΔW_i exactly, at rank Σ_i r_i."""
    return (torch.cat([c * a for a, _, c in items], dim=0),
            torch.cat([b for _, b, _ in items], dim=1))


def _union_targets(configs: Sequence[LoraConfig]) -> list[str] | str | None:
    """PEFT's union of target_modules: lists merge; regexes join as ``(t1)|(t2)``; a mix turns
    each list into the regex of its rule (name == entry or ends with ``.entry``)."""
    targets = [c.target_modules for c in configs if c.target_modules is not None]
    if not targets:
        return None
    if all(isinstance(t, list) for t in targets):
        return sorted({name for t in targets for name in t})
    regexes = [t if isinstance(t, str) else "(.*\\.)?(" + "|".join(map(re.escape, t)) + ")"
               for t in targets]
    return "|".join(f"({t})" for t in regexes)


def _check_combinable(adapters: Sequence[Adapter], weights: Sequence[float], method: str,
                      rank: int | None) -> None:
    if method not in METHODS:
        raise LoraFxError(f"method={method!r} is not supported: use one of {', '.join(METHODS)}")
    if not adapters:
        raise LoraFxError("combine needs at least one adapter")
    if len(weights) != len(adapters):
        raise LoraFxError(f"got {len(weights)} weights for {len(adapters)} adapters: pass one "
                          "weight per adapter")
    if rank is not None and (method != "svd" or not isinstance(rank, int) or rank < 1):
        raise LoraFxError(f"rank={rank!r} applies to method 'svd' only and must be an integer "
                          ">= 1")
    if len({a.config.fan_in_fan_out for a in adapters}) > 1:
        raise LoraFxError("the adapters disagree on fan_in_fan_out: they target different "
                          "model types and cannot be combined")
    if len({m for a in adapters for m in a.saved}) < sum(len(a.saved) for a in adapters):
        raise LoraFxError("several adapters save the same module (modules_to_save): such "
                          "modules cannot be combined; drop them from all adapters but one")


def combine(adapters: Sequence[AdapterLike], weights: Sequence[float], method: str = "svd",
            rank: int | None = None) -> Adapter:
    """One adapter from several, with PEFT's ``add_weighted_adapter`` semantics (c_i = w_i s_i):

    - ``"svd"``: ΔW = Σ_i w_i ΔW_i truncated by SVD to ``rank`` (default: the largest site
      rank of the inputs); exact when ``rank`` >= Σ r_i.
    - ``"cat"``: A, B stacked so that ΔW = Σ_i w_i ΔW_i exactly, at rank Σ r_i.
    - ``"linear"``: A = Σ ± sqrt|c_i| A_i, B = Σ sqrt|c_i| B_i: same rank, cheap, but its ΔW
      carries cross terms B_i A_j (PEFT calls it a rough approximation).

    Weights may be negative. A site missing from some adapters combines the ones that have it.
    The result's sites are the union (each in the dtype of the first adapter that has it); its
    config is the first adapter's with r = the largest site rank, lora_alpha = r (s = 1),
    rsLoRA off, target_modules and modules_to_save the unions. Unlike PEFT, which
    falls back to "linear" for a single adapter, "svd" on one adapter truncates w · ΔW.
    """
    loaded = [as_adapter(a) for a in adapters]
    _refuse_dora(loaded)
    _check_combinable(loaded, weights, method, rank)
    sites = sorted({s for a in loaded for s in a.lora})
    if not sites:
        raise LoraFxError("the adapters have no LoRA site: nothing to combine")
    target = rank or max(a.lora[s][0].shape[0] for a in loaded for s in a.lora)
    parts: dict[str, Factors] = {}
    like: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for site in sites:
        items = _site_inputs(loaded, weights, site)
        like[site] = next(a.lora[site] for a in loaded if site in a.lora)
        if method == "linear":
            parts[site] = _linear(site, items)
        elif method == "cat":
            parts[site] = _cat(items)
        else:
            a_cat, b_cat = _cat(items)
            parts[site], _ = _truncate(b_cat, a_cat, target)
    config = _ranked_config(loaded[0].config, {s: a.shape[0] for s, (a, _) in parts.items()},
                            target_modules=_union_targets([a.config for a in loaded]),
                            modules_to_save=sorted({m for a in loaded
                                                    for m in a.config.modules_to_save or []})
                            or None)
    saved = {k: v for a in loaded for k, v in a.saved.items()}
    return _rebuild(config, parts, like, saved)
