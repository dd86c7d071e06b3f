"""The graph's LoRA on the eager model: each branch as a forward hook on the module it wraps.

A site that is a call of a leaf module M (nn.Linear, HF Conv1D, nn.Embedding, nn.ConvNd) of
the eager model, with a branch that reads M's input alone (plain LoRA; an embedding's also
reads M's output for its dtype), is computed in the graph as y = M(x) + Δ(x). A forward hook
on M returning ``out + branch(x)`` makes the eager model compute that same function with the
graph's own branch modules (the same tensors: PEFT's wrapped layer, without wrapping). This
lets callers use what the eager model has and the captured graph does not: HF ``generate()``
with its KV cache. Variants whose branch reads more (DoRA: y, W, b) or sites that are not a
module's call (``x @ W.T`` in model code, a tied weight used functionally) have no such hook:
:func:`lora_hooks` returns None for a graph that has one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import fx, nn
from torch.utils.hooks import RemovableHandle

from ..branches.base import LoraBranch
from ..passes.state import NODE_KEY, get_state

LEAVES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
Hook = tuple[nn.Module, LoraBranch, bool]  # (module M, its branch, branch reads M's output)


def _is_leaf(module: nn.Module) -> bool:
    """M's forward is exactly the matched op (HF's Conv1D is x @ W + b, known by name)."""
    return isinstance(module, LEAVES) or type(module).__name__ == "Conv1D"


def _innermost(node: fx.Node) -> str | None:
    """The path of the innermost module whose forward made ``node`` (torch.export's meta)."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else None


def _hookable(name: str, deltas: list[fx.Node], module: nn.Module | None) -> bool:
    """Every use of site ``name`` is Δ(x) (embedding: Δ(x, y)) of a call of leaf ``module``."""
    if module is None or not _is_leaf(module) or not deltas:
        return False
    arity = 2 if isinstance(module, nn.Embedding) else 1
    return all(len(d.args) == arity and not d.kwargs and _innermost(d) == name for d in deltas)


def plan_hooks(gm: fx.GraphModule, model: nn.Module) -> list[Hook] | None:
    """One hook per site of ``gm`` on ``model``'s module of that name; None if any site has
    none (see the module docstring); [] for a graph without branches (merged, or none)."""
    state = get_state(gm)
    if state is None:
        return []
    deltas: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        tag = node.meta.get(NODE_KEY) or {}
        if tag.get("role") == "delta":
            deltas.setdefault(tag["site"], []).append(node)
    modules = dict(model.named_modules(remove_duplicate=False))
    hooks: list[Hook] = []
    for name, rec in state.sites.items():
        module, branch = modules.get(name), gm.get_submodule(rec.branch)
        if not isinstance(branch, LoraBranch) or not _hookable(name, deltas.get(name, []),
                                                              module):
            return None
        assert module is not None
        hooks.append((module, branch, isinstance(module, nn.Embedding)))
    return hooks


@contextlib.contextmanager
def hooked(hooks: list[Hook]) -> Iterator[None]:
    """Inside the block each hook's module returns M(x) + branch(x) (branch(x, M(x)))."""
    handles: list[RemovableHandle] = []

    def add(branch: LoraBranch, reads_out: bool) -> Any:
        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
            x = args[0] if args else next(iter(kwargs.values()))
            return out + (branch(x, out) if reads_out else branch(x))
        return hook

    try:
        for module, branch, reads_out in hooks:
            handles.append(module.register_forward_hook(add(branch, reads_out), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
