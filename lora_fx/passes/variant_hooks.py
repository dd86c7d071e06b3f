"""Give every branch its site's delta nodes: variants that read more than x wire it in.

For each ``delta = lora.<site>(x)`` node the inject pass made, ``branch.on_inject(gm, site,
delta)`` (``branches.base.LoraBranch``): a no-op for plain LoRA; DoRA rewires the call to
``lora.<site>(x, y, W, b)`` and sets its magnitude m = ‖W + s·B A‖_r.
"""

from __future__ import annotations

from torch import fx

from ..branches.base import LoraBranch
from ..graph.state import delta_nodes, require_state
from .runner import PassResult


def variant_hooks_pass(gm: fx.GraphModule) -> PassResult:
    """Call each branch's ``on_inject`` at each of its delta nodes."""
    state = require_state(gm)
    changed = 0
    for name, nodes in delta_nodes(gm.graph).items():
        site = state.sites[name]
        branch = gm.get_submodule(site.branch)
        assert isinstance(branch, LoraBranch)
        for node in nodes:
            changed += branch.on_inject(gm, site, node)
    return PassResult(gm, changed > 0, {"wired": changed})
