"""The graph's LoRA on the eager model: each branch as a forward hook on the module it wraps.

A site that is a call of a leaf module M (nn.Linear, HF Conv1D, nn.Embedding, nn.ConvNd) of
the eager model is computed in the graph as y = M(x) + Δ, where Δ reads x, and perhaps y (an
embedding's dtype; DoRA) and M's own weight and bias (DoRA). A forward hook on M returning
``out + branch(x[, out, M.weight, M.bias])`` makes the eager model compute that same function
with the graph's own branch modules (the same tensors: PEFT's wrapped layer, without
wrapping). This lets callers use what the eager model has and the captured graph does not:
HF ``generate()`` with its KV cache. A site that is not a module's call (``x @ W.T`` in model
code, a tied weight read by another module) has no such hook: :func:`plan_hooks` returns None
for a graph that has one.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from ..branches.base import LoraBranch
from ..graph.attrs import cow_module, innermost_module
from ..graph.state import SiteRecord, delta_nodes, get_state

LEAVES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
Hook = tuple[str, LoraBranch, int]  # (module M's path, its branch, how many of x, y, W, b)


def _is_leaf(module: nn.Module) -> bool:
    """M's forward is exactly the matched op (HF's Conv1D is x @ W + b, known by name)."""
    return isinstance(module, LEAVES) or type(module).__name__ == "Conv1D"


def _caller(node: fx.Node) -> str | None:
    found = innermost_module(node)
    return found[0] if found else None


def _reads(branch_args: tuple[Any, ...], rec: SiteRecord, name: str) -> int | None:
    """How many of (x, y, W, b) a delta node passes: 1 (x), 2 (x, y: an embedding's dtype)
    or 4 (DoRA: W and b the site's own parameters); None for anything else."""
    if len(branch_args) in (1, 2):
        return len(branch_args)
    if len(branch_args) != 4:
        return None
    w, b = branch_args[2], branch_args[3]
    own_w = isinstance(w, fx.Node) and w.op == "get_attr" and w.target == rec.weight
    own_b = b is None or (isinstance(b, fx.Node) and b.op == "get_attr"
                          and b.target == f"{name}.bias")
    return 4 if own_w and own_b else None


def _hook_of(gm: fx.GraphModule, rec: SiteRecord, name: str, deltas: list[fx.Node],
             module: nn.Module | None) -> Hook | None:
    """The hook for site ``name`` if every use of it is Δ of a call of leaf ``module`` reading
    only the call's input, output and ``module``'s own weight and bias."""
    if module is None or not _is_leaf(module) or not deltas or \
            getattr(module, "weight", None) is not gm.get_parameter(rec.weight):
        return None
    reads = {_reads(d.args, rec, name) for d in deltas}
    n = reads.pop() if len(reads) == 1 else None
    if n is None or any(d.kwargs or _caller(d) != name for d in deltas):
        return None
    branch = gm.get_submodule(rec.branch)
    return (name, branch, n) if isinstance(branch, LoraBranch) else None


def plan_hooks(gm: fx.GraphModule, model: nn.Module) -> list[Hook] | None:
    """One hook per site of ``gm`` on ``model``'s module of that name; None if any site has
    none (see the module docstring); [] for a graph without branches (merged, or none)."""
    state = get_state(gm)
    if state is None:
        return []
    deltas = delta_nodes(gm.graph)
    modules = dict(model.named_modules(remove_duplicate=False))
    hooks: list[Hook] = []
    for name, rec in state.sites.items():
        hook = _hook_of(gm, rec, name, deltas.get(name, []), modules.get(name))
        if hook is None:
            return None
        hooks.append(hook)
    return hooks


def attach(model: nn.Module, hooks: list[Hook]) -> nn.Module:
    """``model`` with each hook's module M (made a copy of its own first, ``cow_module``)
    returning M(x) + Δ, Δ = branch(x), branch(x, M(x)) or branch(x, M(x), M.weight, M.bias)
    as the site's delta nodes read; ``model`` itself is changed only along those paths."""
    for path, branch, reads in hooks:
        module = cow_module(model, path)
        module.register_forward_hook(_hook(module, branch, reads), with_kwargs=True)
    return model


def _hook(module: nn.Module, branch: LoraBranch, reads: int) -> Any:
    def run(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        x = args[0] if args else next(iter(kwargs.values()))
        return out + branch(*(x, out, module.weight, getattr(module, "bias", None))[:reads])
    return run
