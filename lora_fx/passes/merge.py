"""The merge pass: fold every branch into its weight and erase the branch nodes.

Each branch owns its algebra (``LoraBranch.fold``): W' = W + s · B @ A for an [out, in] weight,
W + (s · B @ A)ᵀ for an [in, out] one (Conv1D, ``x @ W``, embeddings), the reshaped product for
a conv kernel, the slice rows for a fused projection; all in fp32, cast once, refused when not
finite. A tensor that ops outside the site also read (tied weights) is never folded into: the
site's uses get their own W' (``untie``). Otherwise the merged graph is the captured base graph:
exactly the tagged nodes are erased.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from torch import fx, nn

from ..branches.base import LoraBranch
from ..graph.attrs import set_attr_cow
from ..graph.state import NODE_KEY, SiteRecord
from ..match.matcher import weight_readers
from .runner import PassResult
from .untie import untie


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
        if tag and tag["role"] in ("delta", "base"):  # base: W, b read by a DoRA delta
            graph.erase_node(node)
    return erased


def site_uses(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    """Site name → the ops its branch is added to (the first argument of each tagged add)."""
    uses: dict[str, list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        tag = node.meta.get(NODE_KEY)
        if tag and tag["role"] == "add":
            uses[tag["site"]].append(node.args[0])
    return uses


def merge_pass(gm: fx.GraphModule, sites: Mapping[str, SiteRecord],
               branches: Mapping[str, LoraBranch]) -> PassResult:
    """Fold each site's branch into its weight (in ``gm``, copy-on-write) and erase branches."""
    readers = weight_readers(gm)
    uses = site_uses(gm.graph)
    untied = 0
    for name, rec in sites.items():
        weight = gm.get_parameter(rec.weight)
        merged = nn.Parameter(branches[name].fold(weight, rec.layout, where=name),
                              requires_grad=False)
        mine = set(uses[name])
        others = [n for n in readers[id(weight)] if n not in mine and NODE_KEY not in n.meta]
        if others:
            untie(gm, uses[name], weight, merged, name)
            readers[id(weight)] = others
            untied += 1
        else:
            set_attr_cow(gm, rec.weight, merged)
    erased = erase_branches(gm.graph)
    counts = {"merged": len(sites), "untied": untied, "erased": erased}
    return PassResult(gm, erased > 0 or untied > 0, counts)
