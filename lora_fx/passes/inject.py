"""The inject pass: y = op(x)  →  y + Δ(x), Δ(x) = s · B(A(dropout(x))) per chosen site.

Inserted nodes: ``delta = call_module lora.<site>(x)`` then ``add = y + delta``, chained after
the op (each insert after the previous one); every other user of ``y`` reads ``add``. Both
nodes carry ``node.meta["lora"]`` so that merge erases exactly them. The branch class follows
the site's kind (``build_branch``); several uses of one name (a module called twice) share one
branch, as PEFT's wrapped module would.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..branches.base import LoraBranch
from ..branches.conv import LoraConv
from ..branches.embedding import LoraEmbedding
from ..branches.linear import LoraFused, LoraLinear
from ..config import LoraConfig
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
    return branch


def _new_branch(site: Site, config: LoraConfig, dtype: torch.dtype,
                device: torch.device) -> LoraBranch:
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


def _reroute(node: fx.Node, add: fx.Node, delta: fx.Node) -> None:
    """Every user of ``node`` but ``add`` (and ``delta``, which may read it) reads ``add``."""
    node.replace_all_uses_with(add, delete_user_cb=lambda user: user not in (add, delta))


def _insert(graph: fx.Graph, site: Site, path: str) -> None:
    with graph.inserting_after(site.node):
        x = site.node.args[site.x_arg]  # read now: earlier inserts may have rewired it
        # an embedding's Δ takes the lookup's dtype from its output (ids carry none)
        delta = graph.call_module(path, (x, site.node) if site.kind == "embedding" else (x,))
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
