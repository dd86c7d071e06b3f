"""The inject pass: y = op(x)  →  y + Δ(x), Δ(x) = s · B(A(dropout(x))) per chosen site.

Inserted nodes: ``delta = call_module lora.<site>(x)`` then ``add = y + delta``, chained after
the op (each insert after the previous one); every other user of ``y`` reads ``add``. Both
nodes carry ``node.meta["lora"]`` so that merge erases exactly them. The branch class follows
the site's kind (``build_branch``); several uses of one name (a module called twice) share one
branch, as PEFT's wrapped module would.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from ..branches.base import LoraBranch
from ..branches.conv import LoraConv
from ..branches.embedding import LoraEmbedding
from ..branches.experts import LoraExperts
from ..branches.linear import LoraFused, LoraLinear
from ..config import LoraConfig
from ..errors import LoraFxError
from ..graph.attrs import add_submodule
from ..graph.state import BRANCH_ROOT, NODE_KEY, LoraState, SiteRecord
from ..match.matcher import Site
from ..variants.dora import dora_branch
from .runner import PassResult


def adapter_dtype(base: torch.dtype, autocast: bool = True) -> torch.dtype:
    """The dtype of new factors on a base weight of dtype ``base`` (PEFT's policy): fp32 when
    ``autocast`` and ``base`` is a floating dtype narrower than fp32 (fp16, bf16, fp8), else
    ``base``."""
    narrow = base.is_floating_point and torch.finfo(base).bits < 32
    return torch.float32 if autocast and narrow else base


def build_branch(site: Site, config: LoraConfig, dtype: torch.dtype,
                 device: torch.device) -> LoraBranch:
    """The branch for ``site``: its kind's class, rank, scale and init from ``config``;
    ``dtype`` is the base weight's (the factors' follows ``adapter_dtype``)."""
    dtype = adapter_dtype(dtype, config.autocast_adapter_dtype)
    branch = _new_branch(site, config, dtype, device)
    branch.compute = config.branch_compute
    branch.peft_name = str(site.geometry.get("peft_name", ""))
    return branch


def _new_branch(site: Site, config: LoraConfig, dtype: torch.dtype,
                device: torch.device) -> LoraBranch:
    if site.kind == "experts":
        return _experts_branch(site, config, dtype, device)
    if config.use_dora:  # DoRA: its own branch class (lora_fx.variants.dora)
        return dora_branch(site, config, dtype, device)
    r, scale = config.rank_for(site.name), config.scale_for(site.name)
    init, p = config.init_lora_weights, config.lora_dropout
    dims = (site.in_features, site.out_features)
    kw = {"dtype": dtype, "device": device}
    if site.kind == "conv":
        return LoraConv(*dims, r, scale, site.geometry, p, init, **kw)  # type: ignore[arg-type]
    if site.kind == "embedding":
        return LoraEmbedding(*dims, r, scale, site.geometry, init, **kw)  # type: ignore[arg-type]
    mask = config.slices_for(site.name)
    if mask is not None:
        return LoraFused(*dims, r, scale, mask, p, init, **kw)  # type: ignore[arg-type]
    return LoraLinear(*dims, r, scale, p, init, **kw)  # type: ignore[arg-type]


def _experts_branch(site: Site, config: LoraConfig, dtype: torch.dtype,
                    device: torch.device) -> LoraExperts:
    """The branch of an expert stack W [E, d1, d2], oriented as PEFT's ParamWrapper."""
    if config.use_dora:
        raise LoraFxError(f"site {site.name!r} is a stack of {site.experts} experts: DoRA does "
                          "not apply to expert parameters (PEFT refuses it too); set use_dora "
                          "off or leave the experts out")
    if config.init_lora_weights not in (True, False, "gaussian"):
        raise LoraFxError(f"site {site.name!r}: init_lora_weights="
                          f"{config.init_lora_weights!r} is not supported on expert stacks: use "
                          "true, false or 'gaussian'")
    d1, d2 = (site.out_features, site.in_features) if site.layout == "out_in" else \
        (site.in_features, site.out_features)
    return LoraExperts(site.experts, d1, d2, config.rank_for(site.name),
                         config.scale_for(site.name),
                         bool(site.geometry.get("peft_transposed", False)), site.layout,
                         config.lora_dropout, config.init_lora_weights, dtype=dtype,
                         device=device)


def _reroute(node: fx.Node, add: fx.Node, delta: fx.Node) -> None:
    """Every user of ``node`` but ``add`` (and ``delta``, which may read it) reads ``add``."""
    node.replace_all_uses_with(add, delete_user_cb=lambda user: user not in (add, delta))


def _branch_args(site: Site, x: Any) -> tuple[Any, ...]:
    """What the branch is called with: x, and what else its kind reads (an embedding's Δ takes
    the lookup's dtype from its output, ids carry none; an expert site's Δ the expert ids)."""
    if site.kind == "embedding":
        return (x, site.node)
    if site.kind == "experts":
        how = "offsets" if site.grouped else "columns" if site.weight_left else "rows"
        return (x, site.expert_index, how)
    return (x,)


def _insert(graph: fx.Graph, site: Site, path: str) -> None:
    with graph.inserting_after(site.node):
        x = site.node.args[site.x_arg]  # read now: earlier inserts may have rewired it
        delta = graph.call_module(path, _branch_args(site, x))
    with graph.inserting_after(delta):
        add = graph.call_function(operator.add, (site.node, delta))
    _reroute(site.node, add, delta)
    delta.meta[NODE_KEY] = {"site": site.name, "role": "delta"}
    add.meta[NODE_KEY] = {"site": site.name, "role": "add"}
    for key in ("val", "tensor_meta", "nn_module_stack", "stack_trace"):
        if key in site.node.meta:
            add.meta[key] = site.node.meta[key]
            delta.meta[key] = site.node.meta[key]


def inject_pass(gm: fx.GraphModule, sites: list[Site], config: LoraConfig,
                state: LoraState) -> PassResult:
    """Add one branch per site name (called at each of its uses); record each in ``state``."""
    for site in sites:
        path = f"{BRANCH_ROOT}.{site.name}"
        if site.name not in state.sites:
            weight = gm.get_parameter(site.weight)
            add_submodule(gm, path, build_branch(site, config, weight.dtype, weight.device))
            state.sites[site.name] = SiteRecord(site.name, site.weight, site.form, site.layout,
                                                site.in_features, site.out_features, path)
        _insert(gm.graph, site, path)
    return PassResult(gm, bool(sites), {"injected": len(state.sites), "uses": len(sites)})
