"""Fuse the written-out tanh GELU into one ``aten.gelu(approximate="tanh")`` (training speed).

GPT-2 and many models compute their activation from elementwise ops (HF ``NewGELUActivation``):

    0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))

which a torch.export capture records as eight aten ops, each writing an [N, 4d] tensor in the
forward and more in the backward. ``aten.gelu(x, approximate="tanh")`` is the same function
(one kernel each way; outputs agree to fp32 rounding, ~1e-7 relative). Matched by structure and
constants, in the orders HF and torch.export write it; anything else is left alone.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from .runner import PassResult

aten = torch.ops.aten
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _is(node: object, target: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _const(value: object, want: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isclose(float(value), want, rel_tol=1e-6)


def _scaled(node: object, scale: float) -> fx.Node | None:
    """``t`` when ``node`` is ``t · scale`` or ``scale · t`` (aten.mul.Tensor), else None."""
    if not _is(node, aten.mul.Tensor):
        return None
    assert isinstance(node, fx.Node)
    a, b = node.args[:2]
    if isinstance(a, fx.Node) and _const(b, scale):
        return a
    if isinstance(b, fx.Node) and _const(a, scale):
        return b
    return None


def _inner(node: object) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(x, 0.044715·x³, x³) when ``node`` is ``x + 0.044715 · x³`` (either operand order)."""
    if not _is(node, aten.add.Tensor):
        return None
    assert isinstance(node, fx.Node)
    for x, cube in (node.args[:2], node.args[1::-1]):
        power = _scaled(cube, 0.044715)
        if isinstance(x, fx.Node) and isinstance(cube, fx.Node) and power is not None and \
                _is(power, aten.pow.Tensor_Scalar) and power.args[0] is x and \
                _const(power.args[1], 3.0):
            return x, cube, power
    return None


def _match(out: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """(x, the pattern's nodes) when ``out`` = (0.5·x) · (1 + tanh(√(2/π)·(x + 0.044715·x³)))."""
    if not _is(out, aten.mul.Tensor):
        return None
    for half, one_plus in (out.args[:2], out.args[1::-1]):
        x = _scaled(half, 0.5)
        if x is None or not _is(one_plus, aten.add.Tensor):
            continue
        assert isinstance(one_plus, fx.Node) and isinstance(half, fx.Node)
        a, b = one_plus.args[:2]
        tanh = a if _const(b, 1.0) else b if _const(a, 1.0) else None
        if not _is(tanh, aten.tanh.default):
            continue
        assert isinstance(tanh, fx.Node)
        scaled = tanh.args[0]
        add = _scaled(scaled, SQRT_2_OVER_PI)
        inner = _inner(add)
        if add is None or inner is None or inner[0] is not x:
            continue
        assert isinstance(scaled, fx.Node)
        _, cube, power = inner
        return x, [out, one_plus, tanh, scaled, add, cube, power, half]
    return None


def fuse_gelu_pass(gm: fx.GraphModule) -> PassResult:
    """Replace every written-out tanh GELU whose intermediates have no other use."""
    fused = 0
    for node in list(gm.graph.nodes):
        found = _match(node)
        if found is None:
            continue
        x, nodes = found
        internal = set(nodes[1:])
        if any(u not in internal and u is not node for n in internal for u in n.users):
            continue  # an intermediate is used elsewhere: fusing would not remove it
        with gm.graph.inserting_before(node):
            gelu = gm.graph.call_function(aten.gelu.default, (x,), {"approximate": "tanh"})
        gelu.meta = dict(node.meta)
        node.replace_all_uses_with(gelu)
        for n in nodes:  # out first, then its inputs: each is unused once its user is gone
            gm.graph.erase_node(n)
        fused += 1
    return PassResult(gm, fused > 0, {"fused_gelu": fused})
