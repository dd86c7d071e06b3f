"""Fuse each plain linear branch with its add: one GEMM, no Δ tensor.

Each site's ``y + s·B(A(dropout(x)))`` (a module call, a Δ tensor, a scale and an add over the
[N, out] output) becomes two ops on the graph::

    xa  = F.linear(dropout(x), A)                  # [N, r]   (lora_down: A in x's dtype)
    out = addmm(y, xa, Bᵀ, alpha=s)                # y + s · xa Bᵀ  (lora_addmm: in y's dtype)

so the scale is applied inside the GEMM (and, in backward, to the small [N, r] and [r, out]
gradients instead of the [N, out] one). A and B stay the branch modules' parameters, so the
optimizer, ``save_adapter`` and ``merge`` see what they saw before, and training follows PEFT's
dynamics (the scale is not folded into B's values).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..branches.linear import LoraLinear
from ..graph.state import NODE_KEY, require_state
from .runner import PassResult


def lora_down(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x Aᵀ in x's dtype (fp32 factors on a bf16 input are cast inside the graph)."""
    return F.linear(x, a if a.dtype == x.dtype else a.to(x.dtype))


def lora_addmm(y: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, scale: float
               ) -> torch.Tensor:
    """y + scale · xa @ bᵀ as one GEMM over the flattened leading axes: ``addmm(alpha=s)``,
    in y's dtype."""
    b = b if b.dtype == y.dtype else b.to(y.dtype)
    xa = xa if xa.dtype == y.dtype else xa.to(y.dtype)
    out = torch.addmm(y.reshape(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]), b.t(),
                      alpha=scale)
    return out.view(y.shape)


def _fuse_site(gm: fx.GraphModule, name: str, delta: fx.Node, add: fx.Node,
               branch: LoraLinear, path: str) -> None:
    graph = gm.graph
    x, y = delta.args[0], add.args[0]
    tag = {"site": name, "role": "delta"}
    new: list[fx.Node] = []
    with graph.inserting_before(add):
        if not isinstance(branch.lora_dropout, nn.Identity):
            x = graph.call_module(f"{path}.lora_dropout", (x,))
            new.append(x)
        a = graph.get_attr(f"{path}.lora_A.weight")
        b = graph.get_attr(f"{path}.lora_B.weight")
        xa = graph.call_function(lora_down, (x, a))
        out = graph.call_function(lora_addmm, (y, xa, b, branch.scaling))
    for node in (*new, a, b, xa):
        node.meta[NODE_KEY] = dict(tag)
    out.meta = dict(add.meta)
    out.meta[NODE_KEY] = {"site": name, "role": "add"}
    add.replace_all_uses_with(out)
    graph.erase_node(add)
    graph.erase_node(delta)


def _plain_branch(gm: fx.GraphModule, add: fx.Node) -> tuple[str, fx.Node, str] | None:
    """(site, delta node, branch path) when ``add`` is ``y + lora.<site>(x)`` of a LoraLinear."""
    tag = add.meta.get(NODE_KEY)
    if not tag or tag.get("role") != "add" or len(add.args) != 2:
        return None
    delta = add.args[1]
    if not (isinstance(delta, fx.Node) and delta.op == "call_module" and len(delta.users) == 1
            and (delta.meta.get(NODE_KEY) or {}).get("role") == "delta"):
        return None
    rec = require_state(gm).sites.get(tag["site"])
    if rec is None or delta.target != rec.branch or \
            type(gm.get_submodule(rec.branch)) is not LoraLinear or \
            gm.get_submodule(rec.branch).compute != "input":  # "adapter": PEFT's casts, unfused
        return None
    return tag["site"], delta, rec.branch


def fuse_branches_pass(gm: fx.GraphModule) -> PassResult:
    """Replace every plain ``call_module`` branch and its add by ``linear`` + ``lora_addmm``."""
    require_state(gm)
    fused = 0
    for add in list(gm.graph.nodes):
        found = _plain_branch(gm, add)
        if found is not None:
            name, delta, path = found
            branch = gm.get_submodule(path)
            assert isinstance(branch, LoraLinear)
            _fuse_site(gm, name, delta, add, branch, path)
            fused += 1
    return PassResult(gm, fused > 0, {"fused": fused})

