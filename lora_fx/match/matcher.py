"""Find every linear op whose weight is a parameter (``rules``): a Site, or a Skip with why.

A site is named by the path of the weight it reads without a trailing ``.weight``; a tensor
with several paths (tied weights) names each use by the path that belongs to the module
running the op (``lm_head`` vs ``transformer.wte``). A tensor read by several ops is still a
site at each use: the merge gives the targeted uses their own tensor (``passes/untie.py``).
Anything else linear-looking is a ``Skip`` with a reason, so ``lorafx inspect`` can say why.
An op reading one expert (or a per-row gather of experts) of a 3-D parameter is an expert site
named by that parameter (``match.experts``): all its uses share one branch.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from ..graph.attrs import innermost_module, resolve_attr, transposed
from .experts import ExpertUse, expert_use, see_through
from .rules import MODULE_RULES, Layout, Rule, aten, rule_for


@dataclass
class Site:
    """A candidate: the op ``node`` reading parameter ``weight`` with activation ``x``."""

    name: str              # weight path without a trailing ".weight" (see module docstring)
    weight: str            # path the op reads the parameter from, in the GraphModule
    node: fx.Node          # the op whose output gets the branch
    x_arg: int             # position of the activation in node.args (read at insert time)
    form: str
    layout: Layout
    in_features: int       # conv: in channels; embedding: num_embeddings
    out_features: int      # conv: out channels; embedding: embedding dim
    kind: str = "linear"
    geometry: dict[str, Any] = field(default_factory=dict)  # conv / embedding hyperparameters
    module: str = ""       # path of the module running the op ("" for the root)
    module_type: str = ""  # its class, qualified
    shared: tuple[str, ...] = ()  # other ops reading the same tensor (tied weights)
    experts: int = 0       # kind "experts": E of the weight [E, d1, d2] (0: not an expert site)
    expert_index: Any = None  # kind "experts": the expert id (int) or ids node (per row)
    weight_left: bool = False  # kind "experts": bmm(W_sel, x), y = W_sel x (columns)
    grouped: bool = False  # kind "experts": grouped_mm(x, W, offs), expert_index the offsets


@dataclass
class Skip:
    """A linear-looking op that is not a site, and why."""

    node: fx.Node
    name: str
    form: str
    reason: str


def site_name(weight_path: str) -> str:
    return weight_path[: -len(".weight")] if weight_path.endswith(".weight") else weight_path


def _qualname(cls: Any) -> str:
    return cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


def _ops_reading(node: fx.Node, experts: bool) -> list[fx.Node]:
    """The ops reading ``node``'s tensor, through transposes (and, for an expert stack,
    expert selections: ``experts``)."""
    ops: list[fx.Node] = []
    for user in node.users:
        if transposed(user) is node or (experts and see_through(user) is node):
            ops.extend(_ops_reading(user, experts))
        else:
            ops.append(user)
    return ops


def weight_readers(gm: fx.GraphModule) -> dict[int, list[fx.Node]]:
    """id(tensor) → the ops reading it (through a transpose, the transpose's users; through an
    expert selection W[ids] of a 3-D stack, the selection's users)."""
    readers: dict[int, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t = resolve_attr(gm, str(node.target))
            experts = isinstance(t, nn.Parameter) and t.dim() == 3
            readers[id(t)].extend(_ops_reading(node, experts))
        elif node.op == "call_module":
            for p in gm.get_submodule(str(node.target)).parameters():
                readers[id(p)].append(node)
    return readers


def _args(node: fx.Node, names: tuple[str, ...], **defaults: Any) -> dict[str, Any]:
    values = dict(defaults)
    values.update(zip(names, node.args, strict=False))
    values.update(node.kwargs)
    return values


def _ntuple(value: Any, n: int) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return (value,) * n
    items = tuple(int(v) for v in value)
    return items * n if len(items) == 1 else items


def _conv_geometry(node: fx.Node, mod: nn.Module | None, dims: int) -> dict[str, Any] | str:
    """Kernel geometry of a conv op, or the reason it cannot take a LoRA."""
    if mod is not None:
        g = {k: getattr(mod, k) for k in ("kernel_size", "stride", "padding", "dilation",
                                           "groups", "padding_mode")}
    elif node.target is aten.convolution.default:
        g = _args(node, ("input", "weight", "bias", "stride", "padding", "dilation",
                         "transposed", "output_padding", "groups"))
        if g["transposed"]:
            return "transposed convolution: not a LoRA form lorafx supports"
    else:
        g = _args(node, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                  stride=1, padding=0, dilation=1, groups=1)
    if int(g["groups"]) != 1:
        return (f"grouped convolution (groups={g['groups']}): s·B@A mixes all input channels "
                "and cannot fold into a grouped kernel; target another layer")
    return {"dims": dims, "stride": _ntuple(g["stride"], dims),
            "padding": _ntuple(g["padding"], dims), "dilation": _ntuple(g["dilation"], dims),
            "padding_mode": g.get("padding_mode", "zeros")}


def _embedding_geometry(node: fx.Node, mod: nn.Module | None) -> dict[str, Any] | str:
    if mod is not None:
        g = {k: getattr(mod, k) for k in ("padding_idx", "max_norm", "scale_grad_by_freq")}
    elif node.target is aten.embedding.default:
        g = _args(node, ("weight", "indices", "padding_idx", "scale_grad_by_freq"),
                  padding_idx=-1, scale_grad_by_freq=False)
        g["padding_idx"] = None if g["padding_idx"] == -1 else g["padding_idx"]
    else:
        g = _args(node, ("input", "weight", "padding_idx", "max_norm", "norm_type",
                         "scale_grad_by_freq"), padding_idx=None, max_norm=None,
                  scale_grad_by_freq=False)
    if g.get("max_norm") is not None:
        return "embedding with max_norm renormalizes rows: W + ΔW would not stay a sum"
    return {"padding_idx": g["padding_idx"], "scale_grad_by_freq": g["scale_grad_by_freq"]}


class Matcher:
    """Finds sites in a GraphModule; knows every path and reader of each parameter."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.names: dict[int, list[str]] = defaultdict(list)
        for n, p in gm.named_parameters(remove_duplicate=False):
            self.names[id(p)].append(n)
        self.readers = weight_readers(gm)

    def run(self) -> tuple[list[Site], list[Skip]]:
        sites: list[Site] = []
        skips: list[Skip] = []
        for node in self.gm.graph.nodes:
            found = self.match(node)
            if isinstance(found, Site):
                sites.append(found)
            elif isinstance(found, Skip):
                skips.append(found)
        _disambiguate(sites)
        self._mark_shared(sites)
        return sites, skips

    def match(self, node: fx.Node) -> Site | Skip | None:
        if node.op == "call_module":
            mod = self.gm.get_submodule(str(node.target))
            for cls, form, layout, kind in MODULE_RULES:
                if isinstance(mod, cls):
                    by_module = Rule(form, (), 0, 0, layout, kind)
                    return self._site(node, by_module, mod.weight, f"{node.target}.weight", mod)
            return None
        rule = rule_for(node)
        if rule is None or len(node.args) <= max(rule.w_arg, rule.x_arg):
            return None
        use = expert_use(node, rule)
        if use is not None:
            return self._expert_site(node, rule, use)
        if rule.kind == "experts":
            return None  # bmm of two activations (attention scores): not a site
        w, layout = node.args[rule.w_arg], rule.layout
        under = transposed(w) if rule.kind == "linear" else None
        if under is not None:
            w, layout = under, ("in_out" if layout == "out_in" else "out_in")
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            return None  # an activation-by-activation product (attention scores): not a site
        rule = dataclasses.replace(rule, layout=layout)
        return self._site(node, rule, resolve_attr(self.gm, str(w.target)), str(w.target), None)

    def _module_of(self, node: fx.Node) -> tuple[str, str]:
        """(path, class) of the innermost module whose forward runs ``node``."""
        if node.op == "call_module":
            return str(node.target), _qualname(type(self.gm.get_submodule(str(node.target))))
        found = innermost_module(node)
        if found is None:
            return "", ""
        path, cls = found
        return str(path), _qualname(cls)

    def _name(self, weight: Any, path: str, module: str) -> str:
        """The weight path's site name; for a tensor with several paths, the module's own."""
        aliases = self.names.get(id(weight), [path])
        own = [a for a in aliases if a.rpartition(".")[0] == module]
        return site_name(own[0] if len(aliases) > 1 and own else path)

    def _site(self, node: fx.Node, rule: Rule, weight: Any, path: str,
              mod: nn.Module | None) -> Site | Skip:
        module, module_type = self._module_of(node)
        name, form = self._name(weight, path, module), rule.form
        if not isinstance(weight, nn.Parameter):
            return Skip(node, name, form, "weight is a buffer or constant, not a parameter")
        dims = {"linear": (2,), "embedding": (2,), "conv": (3, 4, 5)}[rule.kind]
        if weight.dim() not in dims:
            return Skip(node, name, form, f"weight has {weight.dim()} dims, not {dims[0]}")
        if len(node.args) <= rule.x_arg or not isinstance(node.args[rule.x_arg], fx.Node):
            return Skip(node, name, form, "activation is not a graph value")
        geometry: dict[str, Any] | str = {}
        if rule.kind == "conv":
            form = form if mod is not None else f"conv{weight.dim() - 2}d"
            geometry = _conv_geometry(node, mod, weight.dim() - 2)
            if isinstance(geometry, dict):
                geometry["kernel_size"] = tuple(weight.shape[2:])
        elif rule.kind == "embedding":
            geometry = _embedding_geometry(node, mod)
        if isinstance(geometry, str):
            return Skip(node, name, form, geometry)
        out_f, in_f = weight.shape[:2] if rule.layout == "out_in" else weight.shape[1::-1]
        return Site(name, path, node, rule.x_arg, form, rule.layout, int(in_f), int(out_f),
                    rule.kind, geometry, module, module_type)

    def _expert_site(self, node: fx.Node, rule: Rule, use: ExpertUse) -> Site | Skip:
        """An op reading W[e] / W[ids] of W [E, d1, d2]: in/out per expert, from the layout."""
        module, module_type = self._module_of(node)
        path = str(use.attr.target)
        weight = resolve_attr(self.gm, path)
        name, form = self._name(weight, path, module), rule.form
        if not isinstance(weight, nn.Parameter):
            return Skip(node, name, form, "expert weight is a buffer or constant, not a parameter")
        if weight.dim() != 3:
            return Skip(node, name, form, f"expert selection of a {weight.dim()}-dim weight, not "
                        "of an [experts, d1, d2] stack")
        if not isinstance(node.args[use.x_arg], fx.Node):
            return Skip(node, name, form, "activation is not a graph value")
        experts, d1, d2 = (int(n) for n in weight.shape)
        out_f, in_f = (d1, d2) if use.layout == "out_in" else (d2, d1)
        return Site(name, path, node, use.x_arg, form, use.layout, in_f, out_f, "experts", {},
                    module, module_type, experts=experts, expert_index=use.index,
                    weight_left=use.weight_left, grouped=use.grouped)

    def _mark_shared(self, sites: list[Site]) -> None:
        uses: dict[str, set[fx.Node]] = defaultdict(set)
        for s in sites:
            uses[s.name].add(s.node)
        for s in sites:
            readers = self.readers.get(id(resolve_attr(self.gm, s.weight)), [])
            s.shared = tuple(sorted({r.name for r in readers if r not in uses[s.name]}))


def _disambiguate(sites: list[Site]) -> None:
    """Uses sharing a name must be one module's calls (same weight, kind and layout); any
    other use that lands on a taken name gets ``@<op>`` appended."""
    first: dict[str, Site] = {}
    for s in sites:
        seen = first.setdefault(s.name, s)
        if seen is not s and (seen.weight, seen.kind, seen.layout, seen.form, seen.weight_left,
                              seen.grouped) != (s.weight, s.kind, s.layout, s.form,
                                                s.weight_left, s.grouped):
            s.name = f"{s.name}@{s.node.name}"


def find_sites(gm: fx.GraphModule) -> tuple[list[Site], list[Skip]]:
    """Every candidate site in graph order, and every linear-looking op that is not one."""
    return Matcher(gm).run()

