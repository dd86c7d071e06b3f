"""The inject pass: y = op(x)  →  y + Δ(x), Δ(x) = s · B(A(dropout(x))) per chosen site.

Inserted nodes: ``delta = call_module lora.<site>(x)`` then ``add = y + delta``, chained after
the op (each insert after the previous one); every other user of ``y`` reads ``add``. Both
nodes carry ``node.meta["lora"]`` so that merge erases exactly them.
"""

from __future__ import annotations

import operator

from torch import fx

from ..branches import LoraLinear
from ..config import LoraConfig
from ..patterns import Site
from .runner import PassResult
from .state import BRANCH_ROOT, NODE_KEY, LoraState, SiteRecord, add_submodule


def _reroute(node: fx.Node, add: fx.Node) -> None:
    """Every user of ``node`` but ``add`` reads ``add`` instead."""
    node.replace_all_uses_with(add, delete_user_cb=lambda user: user is not add)


def inject_pass(gm: fx.GraphModule, sites: list[Site], config: LoraConfig,
                state: LoraState) -> PassResult:
    """Add one LoraLinear branch per site; record each in ``state``."""
    graph = gm.graph
    for site in sites:
        weight = gm.get_parameter(site.weight)
        r = config.rank_for(site.name)
        branch = LoraLinear(site.in_features, site.out_features, r, config.scale_for(site.name),
                            config.lora_dropout, config.init_lora_weights,
                            dtype=weight.dtype, device=weight.device)
        path = f"{BRANCH_ROOT}.{site.name}"
        add_submodule(gm, path, branch)
        with graph.inserting_after(site.node):
            x = site.node.args[site.x_arg]  # read now: earlier inserts may have rewired it
            delta = graph.call_module(path, (x,))
        with graph.inserting_after(delta):
            add = graph.call_function(operator.add, (site.node, delta))
        _reroute(site.node, add)
        delta.meta[NODE_KEY] = {"site": site.name, "role": "delta"}
        add.meta[NODE_KEY] = {"site": site.name, "role": "add"}
        for key in ("val", "tensor_meta", "nn_module_stack", "stack_trace"):
            if key in site.node.meta:
                add.meta[key] = site.node.meta[key]
                delta.meta[key] = site.node.meta[key]
        state.sites[site.name] = SiteRecord(site.name, site.weight, site.form, site.layout,
                                            site.in_features, site.out_features, path)
    return PassResult(gm, bool(sites), {"injected": len(sites)})
