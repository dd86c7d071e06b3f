"""Expert sites: a linear op whose weight is one expert (or a per-row gather of experts) of a
3-D parameter W [E, d1, d2] stacked along axis 0.

Forms (``W_sel`` = W[e] for an int e, or W[ids] [S, d1, d2] for routed rows):

- ``F.linear(x, W[e])``:               y = x W_eᵀ        x contracts with d2 ("out_in")
- ``x @ W[e]`` / ``matmul``:            y = x W_e         x contracts with d1 ("in_out")
- ``bmm(x, W[ids])`` (x [S, n, d1]):    y_s = x_s W_{ids_s}              ("in_out")
- ``bmm(W[ids], x)`` (x [S, d2, n]):    y_s = W_{ids_s} x_s, the weight on the left ("out_in"),
  transformers' ``batched_mm`` experts (``_batched_linear``, not ``is_transposed``)

- ``grouped_mm(x, W.mT, offs)`` (x [S, d2] sorted by expert; rows [offs[e-1], offs[e]) use
  W[e]): transformers' ``grouped_mm`` experts ("out_in"; ``grouped_mm(x, W, offs)``: "in_out")

and each with the selection transposed on its last two axes (the layout flips). The selection is
``aten.index.Tensor(W, [ids])``, ``aten.index_select(W, 0, ids)``, ``aten.select.int(W, 0, e)``
or ``W[e]`` / ``W[ids]`` (``getitem`` under symbolic_trace). Since the op is linear in W_sel,
a branch adding s·ΔW_e to each selected expert is Δ(x) = s·(x U_e) V_e for ΔW_e = U_e V_e,
which gathers only the factors of the routed experts (``branches.LoraExperts``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from ..graph.attrs import transposed
from .rules import Layout, Rule

aten = torch.ops.aten


@dataclass(frozen=True)
class ExpertUse:
    """How an op reads a 3-D parameter through an expert selection."""

    attr: fx.Node          # get_attr of W [E, d1, d2]
    index: Any             # the expert id: an int, or a node of ids (one per row)
    x_arg: int             # position of the activation in the op's args
    layout: Layout         # "out_in": x contracts with d2; "in_out": with d1
    weight_left: bool      # bmm(W_sel, x): y = W_sel x (columns), else rows y = x W_sel
    grouped: bool = False  # grouped_mm(x, W, offs): ``index`` is the offsets of the row blocks


def _swap_last(node: Any) -> Any | None:
    """The value under a swap of the last two axes of a 3-D value, else None."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return None
    args: tuple[Any, ...] = tuple(node.args)
    if node.target in (aten.transpose.int, torch.transpose, "transpose") and len(args) >= 3:
        return args[0] if {args[1], args[2]} in ({1, 2}, {-1, -2}) else None
    if node.target is aten.permute.default and list(args[1]) == [0, 2, 1]:
        return args[0]
    return None


def _picked(node: Any) -> tuple[Any, Any] | None:
    """(value, index) when ``node`` picks rows of a value along axis 0 by an int or ids."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or len(node.args) < 2:
        return None
    t, args = node.target, tuple(node.args)
    index: Any = None
    if t is aten.index.Tensor and isinstance(args[1], (list, tuple)) and len(args[1]) == 1:
        index = args[1][0]
    elif t in (aten.index_select.default, torch.index_select, aten.select.int) and \
            len(args) == 3 and args[1] == 0:
        index = args[2]
    elif t is operator.getitem:
        index = args[1]
    if isinstance(index, bool) or not isinstance(index, (int, fx.Node)):
        return None
    return args[0], index


def see_through(node: fx.Node) -> Any | None:
    """The value ``node`` selects experts from or swaps the last axes of, else None."""
    under = _swap_last(node)
    picked = _picked(node)
    return under if under is not None else (picked[0] if picked is not None else None)


def _selection(node: Any) -> tuple[fx.Node, Any, bool] | None:
    """(get_attr W, expert index, flipped) when ``node`` picks experts of W along axis 0;
    ``flipped`` when W's last two axes were swapped first (``W.transpose(-1, -2)[ids]``)."""
    picked = _picked(node)
    if picked is None:
        return None
    w, index = picked
    under = _swap_last(w)
    flipped = under is not None
    w = under if flipped else w
    if isinstance(w, fx.Node) and w.op == "get_attr":
        return w, index, flipped
    return None


def expert_weight(node: Any) -> tuple[fx.Node, Any, bool] | None:
    """(get_attr W, index, flipped) when ``node`` is an expert selection of W, its last two
    axes swapped before or after or not at all (``flipped``: the op's layout flips)."""
    found = _selection(node)
    if found is not None:
        return found
    under = _swap_last(node)
    found = _selection(under if under is not None else transposed(node))
    if found is None or (under is None and not isinstance(found[1], int)):
        return None  # a (0, 1) transpose flips the last axes of W[e] only, not of W[ids]
    w, index, flipped = found
    return w, index, not flipped


def expert_use(node: fx.Node, rule: Rule) -> ExpertUse | None:
    """How ``node`` (an op of ``rule``) reads an expert selection, or None."""
    if rule.form == "grouped_mm":  # the whole stack (maybe transposed) and the offsets
        return _grouped_use(node)
    if rule.form == "bmm":  # weight on either side: bmm(W_sel, x) or bmm(x, W_sel)
        for w_arg, x_arg, left in ((0, 1, True), (1, 0, False)):
            found = expert_weight(node.args[w_arg]) if len(node.args) > 1 else None
            if found is not None:
                attr, index, flip = found
                base: Layout = "out_in" if left else "in_out"
                return ExpertUse(attr, index, x_arg, _flip(base) if flip else base, left)
        return None
    if rule.kind != "linear" or len(node.args) <= max(rule.w_arg, rule.x_arg):
        return None
    found = expert_weight(node.args[rule.w_arg])
    if found is None:
        return None
    attr, index, flip = found
    return ExpertUse(attr, index, rule.x_arg, _flip(rule.layout) if flip else rule.layout, False)


def _grouped_use(node: fx.Node) -> ExpertUse | None:
    """grouped_mm(x, W, offs) or grouped_mm(x, W.transpose(-2, -1), offs)."""
    w = node.args[1]
    offs = node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")
    under = _swap_last(w)
    attr = under if under is not None else w
    if not (isinstance(attr, fx.Node) and attr.op == "get_attr" and isinstance(offs, fx.Node)):
        return None
    return ExpertUse(attr, offs, 0, "out_in" if under is not None else "in_out", False, True)


def _flip(layout: Layout) -> Layout:
    return "in_out" if layout == "out_in" else "out_in"
