"""The merge pass: fold every branch into its weight and erase the branch nodes.

For a site with weight W [out, in]:  W' = W + s · B @ A.  For an [in, out] weight (Conv1D,
``x @ W``):  W' = W + (s · B @ A)ᵀ. Computed in fp32, cast once to W's dtype, refused when not
finite. The merged graph is the captured base graph: exactly the tagged nodes are erased.
"""

from __future__ import annotations

import torch
from torch import fx

from ..branches import LoraLinear
from ..errors import LoraFxError
from .runner import PassResult
from .state import NODE_KEY, SiteRecord, set_attr_cow


def folded_weight(weight: torch.Tensor, branch: LoraLinear, layout: str,
                  site: str) -> torch.Tensor:
    """W + ΔW in fp32, cast once to W's dtype; LoraFxError when the result is not finite."""
    delta = branch.delta_weight()
    if layout == "in_out":
        delta = delta.t()
    merged = weight.detach().float() + delta.to(weight.device)
    if not torch.isfinite(merged).all():
        raise LoraFxError(f"merging site {site!r} gives non-finite weights: the adapter holds "
                          "inf/nan or overflows; check its training")
    return merged.to(weight.dtype)


def erase_branches(graph: fx.Graph) -> int:
    """Erase the nodes tagged by inject: each ``add`` is replaced by the op output it wraps."""
    erased = 0
    for node in reversed(list(graph.nodes)):
        tag = node.meta.get(NODE_KEY)
        if tag and tag["role"] == "add":
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            erased += 1
    for node in reversed(list(graph.nodes)):
        tag = node.meta.get(NODE_KEY)
        if tag and tag["role"] == "delta":
            graph.erase_node(node)
    return erased


def merge_pass(gm: fx.GraphModule, sites: dict[str, SiteRecord],
               branches: dict[str, LoraLinear]) -> PassResult:
    """Fold each site's branch into its weight (in ``gm``, copy-on-write) and erase branches."""
    for name, rec in sites.items():
        weight = gm.get_parameter(rec.weight)
        merged = folded_weight(weight, branches[name], rec.layout, name)
        set_attr_cow(gm, rec.weight, torch.nn.Parameter(merged, requires_grad=False))
    erased = erase_branches(gm.graph)
    return PassResult(gm, erased > 0, {"merged": len(sites), "erased": erased})
