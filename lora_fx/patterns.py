"""Match every linear op whose weight is a parameter: one rule per form, as data.

Each rule names the ops of one form, where its activation ``x`` and weight sit, and the weight's
natural layout. Algebra, for a branch ``Δ(x) = s·B(A(x))`` added to the op's output:

- ``nn.Linear`` (call_module), ``F.linear`` / ``aten.linear``:  y = x Wᵀ + b, W [out, in]
  → y + s·x Aᵀ Bᵀ = x (W + s·B A)ᵀ + b.
- ``x @ W`` / ``torch.matmul`` / ``aten.matmul`` / ``aten.mm``:  y = x W, W [in, out]
  → y + s·x Aᵀ Bᵀ = x (W + s·(B A)ᵀ).
- ``addmm(b, x, W)`` (HF Conv1D, fan_in_fan_out):  y = b + x W, W [in, out] → as matmul.
- A transposed weight (``W.t()``, ``W.T``, ``aten.t``, ``aten.transpose(W, 0, 1)``,
  ``aten.permute(W, [1, 0])``, ``aten.numpy_T``) flips the layout: ``x @ W.t()`` is [out, in].

A weight is a candidate only if it is a 2-D parameter read by this op alone; anything else is a
``Skip`` with a reason, so ``lorafx inspect`` can say why a layer is not targeted.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten
Layout = Literal["out_in", "in_out"]


@dataclass(frozen=True)
class Rule:
    """One linear form: ops, argument positions of x and W, and W's layout when untransposed."""

    form: str
    targets: tuple[Any, ...]
    x_arg: int
    w_arg: int
    layout: Layout


RULES: tuple[Rule, ...] = (
    Rule("F.linear", (F.linear, torch._C._nn.linear, aten.linear.default), 0, 1, "out_in"),
    Rule("matmul", (operator.matmul, torch.matmul, torch.mm, aten.matmul.default,
                    aten.mm.default, "matmul", "mm"), 0, 1, "in_out"),
    Rule("addmm", (torch.addmm, aten.addmm.default, "addmm"), 1, 2, "in_out"),
)


@dataclass
class Site:
    """A candidate: the op ``node`` reading 2-D parameter ``weight`` with activation ``x``."""

    name: str              # weight path without a trailing ".weight"
    weight: str            # path of the parameter in the GraphModule
    node: fx.Node          # the op whose output gets the branch
    x_arg: int             # position of the activation in node.args (read at insert time)
    form: str
    layout: Layout
    in_features: int
    out_features: int


@dataclass
class Skip:
    """A linear-looking op that is not a site, and why."""

    node: fx.Node
    name: str
    form: str
    reason: str


def site_name(weight_path: str) -> str:
    return weight_path[: -len(".weight")] if weight_path.endswith(".weight") else weight_path


def _transposed(node: Any) -> Any | None:
    """The tensor under a 2-D transpose node, or None if ``node`` is not one."""
    if not isinstance(node, fx.Node):
        return None
    t, args = node.target, node.args
    if node.op == "call_method" and t == "t":
        return args[0]
    if node.op == "call_function":
        if t in (torch.t, aten.t.default, aten.numpy_T.default):
            return args[0]
        if t is getattr and args[1] in ("T", "mT"):
            return args[0]
        if t in (aten.transpose.int, torch.transpose) and set(args[1:3]) in ({0, 1}, {-1, -2}):
            return args[0]
        if t is aten.permute.default and isinstance(args[1], (list, tuple)) and \
                list(args[1]) == [1, 0]:
            return args[0]
    if node.op == "call_method" and t == "transpose" and set(args[1:3]) in ({0, 1}, {-1, -2}):
        return args[0]
    return None


def _rule_for(node: fx.Node) -> Rule | None:
    if node.op not in ("call_function", "call_method"):
        return None
    for rule in RULES:
        if node.target in rule.targets and (node.op == "call_function") != isinstance(
                node.target, str):
            return rule
    return None


class Matcher:
    """Finds sites in a GraphModule; counts who reads each parameter to detect ties."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.params = {id(p): n for n, p in gm.named_parameters(remove_duplicate=True)}
        self.readers: dict[int, list[str]] = defaultdict(list)
        self.names: dict[int, list[str]] = defaultdict(list)
        for n, p in gm.named_parameters(remove_duplicate=False):
            self.names[id(p)].append(n)
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                t = _attr(gm, node.target)
                for user in node.users:
                    under = user if _transposed(user) is None else next(iter(user.users), user)
                    self.readers[id(t)].append(under.name)
            elif node.op == "call_module":
                for p in gm.get_submodule(node.target).parameters():
                    self.readers[id(p)].append(node.name)

    def run(self) -> tuple[list[Site], list[Skip]]:
        sites: list[Site] = []
        skips: list[Skip] = []
        for node in self.gm.graph.nodes:
            found = self.match(node)
            if isinstance(found, Site):
                sites.append(found)
            elif isinstance(found, Skip):
                skips.append(found)
        return sites, skips

    def match(self, node: fx.Node) -> Site | Skip | None:
        if node.op == "call_module":
            mod = self.gm.get_submodule(str(node.target))
            if not isinstance(mod, nn.Linear):
                return None
            path = f"{node.target}.weight"
            return self._site(node, 0, mod.weight, path, "nn.Linear", "out_in")
        rule = _rule_for(node)
        if rule is None or len(node.args) <= rule.w_arg:
            return None
        w, layout = node.args[rule.w_arg], rule.layout
        under = _transposed(w)
        if under is not None:
            w, layout = under, ("in_out" if layout == "out_in" else "out_in")
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            return None  # an activation-by-activation product (attention scores): not a site
        t = _attr(self.gm, str(w.target))
        return self._site(node, rule.x_arg, t, str(w.target), rule.form, layout)

    def _site(self, node: fx.Node, x_arg: int, weight: Any, path: str, form: str,
              layout: Layout) -> Site | Skip:
        name = site_name(path)
        if not isinstance(weight, nn.Parameter):
            return Skip(node, name, form, "weight is a buffer or constant, not a parameter")
        if weight.dim() != 2:
            return Skip(node, name, form, f"weight has {weight.dim()} dims, not 2")
        if len(node.args) <= x_arg or not isinstance(node.args[x_arg], fx.Node):
            return Skip(node, name, form, "activation is not a graph value")
        readers = self.readers.get(id(weight), [])
        aliases = self.names.get(id(weight), [path])
        if len(readers) > 1 or len(aliases) > 1:
            tie = ", ".join(sorted(set(aliases))) if len(aliases) > 1 else path
            return Skip(node, name, form, f"weight is tied/shared ({tie}; read by "
                        f"{len(readers)} ops): a LoRA here would change the other uses too")
        out_f, in_f = weight.shape if layout == "out_in" else weight.shape[::-1]
        return Site(name, path, node, x_arg, form, layout, int(in_f), int(out_f))


def _attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def find_sites(gm: fx.GraphModule) -> tuple[list[Site], list[Skip]]:
    """Every candidate site in graph order, and every linear-looking op that is not one."""
    return Matcher(gm).run()

