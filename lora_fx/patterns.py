"""Match every linear op whose weight is a parameter: one rule per form, as data.

Each rule names the ops of one form, where its activation ``x`` and weight sit, the weight's
natural layout and the site kind (which branch serves it). Algebra, for a branch Δ added to
the op's output:

- ``nn.Linear``, ``F.linear`` / ``aten.linear``:  y = x Wᵀ + b, W [out, in]
  → y + s·x Aᵀ Bᵀ = x (W + s·B A)ᵀ + b.
- ``x @ W`` / ``torch.matmul`` / ``aten.matmul`` / ``aten.mm``:  y = x W, W [in, out]
  → y + s·x Aᵀ Bᵀ = x (W + s·(B A)ᵀ).
- ``addmm(b, x, W)`` (HF Conv1D, fan_in_fan_out):  y = b + x W, W [in, out] → as matmul.
- A transposed weight (``W.t()``, ``W.T``, ``aten.t``, ``aten.transpose(W, 0, 1)``,
  ``aten.permute(W, [1, 0])``, ``aten.numpy_T``) flips the layout: ``x @ W.t()`` is [out, in].
- conv (``nn.ConvNd``, ``F.convNd``, ``aten.convNd``, ``aten.convolution``): y = conv(x, W),
  W [out, in, *k], linear in W → y + s·B(A(x)) = conv(x, W + s·B·A), A a conv with W's
  geometry into r channels, B 1×1 (``branches.LoraConv``). groups ≠ 1 and transposed: Skip.
- embedding (``nn.Embedding``, ``F.embedding``, ``aten.embedding``): y = W[ids], W [num, dim]
  = onehot(ids) W, an [in, out] weight → W + s·(B A)ᵀ (``branches.LoraEmbedding``).

A site is named by the path of the weight it reads without a trailing ``.weight``; a tensor
with several paths (tied weights) names each use by the path that belongs to the module
running the op (``lm_head`` vs ``transformer.wte``). A tensor read by several ops is still a
site at each use: the merge gives the targeted uses their own tensor (``passes/untie.py``).
Anything else linear-looking is a ``Skip`` with a reason, so ``lorafx inspect`` can say why.
"""

from __future__ import annotations

import dataclasses
import operator
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import LoraFxError

if TYPE_CHECKING:
    from .config import LoraConfig

aten = torch.ops.aten
Layout = Literal["out_in", "in_out"]
KINDS = ("linear", "conv", "embedding")


@dataclass(frozen=True)
class Rule:
    """One form: ops, argument positions of x and W, W's layout when untransposed, kind."""

    form: str
    targets: tuple[Any, ...]
    x_arg: int
    w_arg: int
    layout: Layout
    kind: str = "linear"


RULES: tuple[Rule, ...] = (
    Rule("F.linear", (F.linear, torch._C._nn.linear, aten.linear.default), 0, 1, "out_in"),
    Rule("matmul", (operator.matmul, torch.matmul, torch.mm, aten.matmul.default,
                    aten.mm.default, "matmul", "mm"), 0, 1, "in_out"),
    Rule("addmm", (torch.addmm, aten.addmm.default, "addmm"), 1, 2, "in_out"),
    Rule("conv", (torch.conv1d, torch.conv2d, torch.conv3d, aten.conv1d.default,
                  aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding,
                  aten.conv2d.padding, aten.conv3d.padding, aten.convolution.default),
         0, 1, "out_in", "conv"),
    Rule("embedding", (F.embedding,), 0, 1, "in_out", "embedding"),
    Rule("embedding", (aten.embedding.default,), 1, 0, "in_out", "embedding"),
)
MODULE_RULES: tuple[tuple[type[nn.Module], str, Layout, str], ...] = (
    (nn.Linear, "nn.Linear", "out_in", "linear"),
    (nn.Conv1d, "nn.Conv1d", "out_in", "conv"),
    (nn.Conv2d, "nn.Conv2d", "out_in", "conv"),
    (nn.Conv3d, "nn.Conv3d", "out_in", "conv"),
    (nn.Embedding, "nn.Embedding", "in_out", "embedding"),
)
FORMS = ("nn.Linear", "F.linear", "matmul", "addmm", "nn.Conv1d", "nn.Conv2d", "nn.Conv3d",
         "conv1d", "conv2d", "conv3d", "nn.Embedding", "embedding")


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


def _attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _qualname(cls: Any) -> str:
    return cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


def weight_readers(gm: fx.GraphModule) -> dict[int, list[fx.Node]]:
    """id(tensor) → the ops reading it (through a transpose, the transpose's users)."""
    readers: dict[int, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t = _attr(gm, str(node.target))
            for user in node.users:
                readers[id(t)].extend(user.users if _transposed(user) is node else [user])
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
        rule = _rule_for(node)
        if rule is None or len(node.args) <= max(rule.w_arg, rule.x_arg):
            return None
        w, layout = node.args[rule.w_arg], rule.layout
        under = _transposed(w) if rule.kind == "linear" else None
        if under is not None:
            w, layout = under, ("in_out" if layout == "out_in" else "out_in")
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            return None  # an activation-by-activation product (attention scores): not a site
        rule = dataclasses.replace(rule, layout=layout)
        return self._site(node, rule, _attr(self.gm, str(w.target)), str(w.target), None)

    def _module_of(self, node: fx.Node) -> tuple[str, str]:
        """(path, class) of the innermost module whose forward runs ``node``."""
        if node.op == "call_module":
            return str(node.target), _qualname(type(self.gm.get_submodule(str(node.target))))
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return "", ""
        path, cls = list(stack.values())[-1]
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

    def _mark_shared(self, sites: list[Site]) -> None:
        uses: dict[str, set[fx.Node]] = defaultdict(set)
        for s in sites:
            uses[s.name].add(s.node)
        for s in sites:
            readers = self.readers.get(id(_attr(self.gm, s.weight)), [])
            s.shared = tuple(sorted({r.name for r in readers if r not in uses[s.name]}))


def _disambiguate(sites: list[Site]) -> None:
    """Uses sharing a name must be one module's calls (same weight, kind and layout); any
    other use that lands on a taken name gets ``@<op>`` appended."""
    first: dict[str, Site] = {}
    for s in sites:
        seen = first.setdefault(s.name, s)
        if seen is not s and (seen.weight, seen.kind, seen.layout, seen.form) != (
                s.weight, s.kind, s.layout, s.form):
            s.name = f"{s.name}@{s.node.name}"


def find_sites(gm: fx.GraphModule) -> tuple[list[Site], list[Skip]]:
    """Every candidate site in graph order, and every linear-looking op that is not one."""
    return Matcher(gm).run()


# --- PEFT reach ---------------------------------------------------------------------------
def _resolve(qualname: str) -> type | None:
    """The class named ``qualname`` if its module is already imported (never imports)."""
    modname, _, attr = qualname.rpartition(".")
    obj: Any = sys.modules.get(modname)
    for part in attr.split(".") if obj is not None else []:
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) else None


def _is_hf_conv1d(cls: type) -> bool:
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers")
               for c in cls.__mro__)


def peft_reachable(site: Site) -> bool:
    """True when PEFT's LoRA can wrap the module running this op and computes the same Δ.

    PEFT wraps nn.Linear, HF Conv1D, nn.Conv1d/2d/3d (without dilation or a padding mode, which
    its A conv drops), nn.Embedding and nn.MultiheadAttention (in_proj_weight and out_proj,
    always together); a weight read functionally, outside its module's own op, is out of reach.
    """
    cls = _resolve(site.module_type) if site.module_type else None
    if cls is None:
        return False
    if issubclass(cls, nn.MultiheadAttention):
        return site.name in (f"{site.module}.in_proj_weight", f"{site.module}.out_proj")
    if site.name != site.module:
        return False
    if site.kind == "linear":
        return (issubclass(cls, nn.Linear) and site.form in ("nn.Linear", "F.linear")) or \
            (_is_hf_conv1d(cls) and site.form == "addmm")
    if site.kind == "conv":
        g = site.geometry
        return issubclass(cls, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and \
            set(g["dilation"]) == {1} and g["padding_mode"] == "zeros"
    return site.kind == "embedding" and issubclass(cls, nn.Embedding)


# --- targeting ----------------------------------------------------------------------------
ALL_LINEAR = "all-linear"
SEQ_CLS_HEADS = ("score", "classifier")


def output_heads(model: nn.Module | None, config: LoraConfig) -> set[str]:
    """PEFT's ``all-linear`` exclusions: a PreTrainedModel's output embeddings, else for
    task_type SEQ_CLS its ``score`` / ``classifier``; nothing for other models."""
    pretrained = getattr(sys.modules.get("transformers"), "PreTrainedModel", None)
    if model is None or pretrained is None or not isinstance(model, pretrained):
        return set()
    head = model.get_output_embeddings()  # type: ignore[operator]
    if head is None and config.task_type == "SEQ_CLS":
        head = next((getattr(model, n) for n in SEQ_CLS_HEADS if hasattr(model, n)), None)
    return {next(n for n, m in model.named_modules() if m is head)} if head is not None else set()


def _why_not(site: Site, config: LoraConfig, named: LoraConfig, heads: set[str]) -> str | None:
    """None when ``config`` targets ``site``, else the reason (for inspect and plan)."""
    forms = config.target_forms
    if forms and site.form not in forms and site.kind not in forms:
        return f"form {site.form} ({site.kind}) is not in target_forms"
    if config.is_excluded(site.name):
        return "excluded by exclude_modules"
    if config.saves(site.name):
        return "in modules_to_save (trained in full)"
    if config.target_modules is None:
        if not forms:
            return "no target_modules"
        return None if config._layer_ok(site.name) else "not in layers_to_transform"
    if named.targets(site.name):
        return None
    if config.target_modules == ALL_LINEAR:
        return ("output head: all-linear leaves it out, as PEFT" if site.name in heads
                else f"all-linear takes linear forms only, not {site.kind}")
    return "not named by target_modules"


def _check(site: Site, config: LoraConfig) -> None:
    mask = config.slices_for(site.name)
    if mask is not None and (site.kind != "linear" or site.out_features % len(mask)):
        raise LoraFxError(f"enable_lora {mask} cannot apply to site {site.name!r} ({site.kind}, "
                          f"{site.out_features} outputs): it needs a linear site whose outputs "
                          "split evenly; fix the enable_lora key")


def select(sites: list[Site], config: LoraConfig,
           model: nn.Module | None = None) -> tuple[list[Site], list[Skip]]:
    """Split ``sites`` into those ``config`` targets and the rest (each with its reason).

    ``target_modules`` as PEFT (``"all-linear"``: every linear-kind site but the output head,
    expanded to full names first, as PEFT does); ``target_forms`` (lorafx only) keeps sites
    whose form or kind it lists, and alone targets every such site.
    """
    unknown = sorted(set(config.target_forms or []) - set(FORMS) - set(KINDS))
    if unknown:
        raise LoraFxError(f"target_forms has unknown form {unknown[0]!r}: use a kind "
                          f"({', '.join(KINDS)}) or a form ({', '.join(FORMS)})")
    heads: set[str] = set()
    named = config
    if config.target_modules == ALL_LINEAR:
        heads = output_heads(model, config)
        linear = sorted({s.name for s in sites if s.kind == "linear"} - heads)
        named = dataclasses.replace(config, target_modules=linear)
    chosen: list[Site] = []
    rest: list[Skip] = []
    for site in sites:
        reason = _why_not(site, config, named, heads)
        if reason is None:
            _check(site, config)
            chosen.append(site)
        else:
            rest.append(Skip(site.node, site.name, site.form, reason))
    return chosen, rest
