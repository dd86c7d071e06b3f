"""How a call maps onto a captured graph: the model's ``forward`` signature, a capture's inputs.

A torch.export capture computes ``model.forward`` for arguments of the kinds it was captured
with: each named argument a tensor (of one dtype and rank, its size fixed on the axes export
specialized), ``None`` or a constant. A call *fits* a capture when, after binding it to the
signature with defaults applied, every argument is of the capture's kind: a tensor where the
capture had one (same dtype and rank, the same size on each fixed axis), otherwise an equal
value. ``**kwargs`` extras count as arguments too.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from ..errors import LoraFxError, some

_NAMED = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_CONSTANTS = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class Call:
    """A call bound to ``forward``'s signature: positional values, then ``**kwargs`` extras."""

    names: tuple[str, ...]          # every positional parameter, in order
    values: tuple[Any, ...]         # their values (defaults applied)
    extras: Mapping[str, Any]       # keyword-only and ``**kwargs`` arguments, None dropped

    def arguments(self) -> dict[str, Any]:
        return {**dict(zip(self.names, self.values, strict=True)), **self.extras}

    def leading(self, defaults: Mapping[str, Any]) -> tuple[Any, ...]:
        """The positional values up to the last one that differs from its default."""
        last = max((i for i, (n, v) in enumerate(zip(self.names, self.values, strict=True))
                    if not _same(v, defaults.get(n, inspect.Parameter.empty))), default=-1)
        return self.values[: last + 1]


@dataclass(frozen=True)
class TensorSlot:
    """A tensor argument of a capture: its dtype and each axis' fixed size (None: dynamic)."""

    dtype: torch.dtype
    sizes: tuple[int | None, ...]

    def accepts(self, value: Any) -> bool:
        return isinstance(value, torch.Tensor) and value.dtype == self.dtype and \
            value.dim() == len(self.sizes) and \
            all(s is None or s == n for s, n in zip(self.sizes, value.shape, strict=True))


Pattern = dict[str, Any]  # argument name -> (pytree spec, its leaves' TensorSlots or values)


def defaults(signature: inspect.Signature) -> dict[str, Any]:
    return {n: p.default for n, p in signature.parameters.items()
            if p.default is not inspect.Parameter.empty}


def bind(signature: inspect.Signature, args: tuple[Any, ...], kwargs: Mapping[str, Any],
         where: str = "the model") -> Call:
    """``args``/``kwargs`` bound to ``signature`` (defaults applied); a LoraFxError if they
    do not fit it (the message names the model's parameters)."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as err:
        names = [n for n, p in signature.parameters.items() if p.kind in _NAMED]
        raise LoraFxError(f"{where}: {err}; it takes {some(names, list(kwargs))}") from err
    bound.apply_defaults()
    names, values, extras = [], [], {}
    for name, param in signature.parameters.items():
        value = bound.arguments.get(name)
        if param.kind in _NAMED:
            names.append(name)
            values.append(value)
        elif param.kind == inspect.Parameter.KEYWORD_ONLY and value is not None:
            extras[name] = value
        elif param.kind == inspect.Parameter.VAR_KEYWORD:
            extras.update({k: v for k, v in (value or {}).items() if v is not None})
        elif param.kind == inspect.Parameter.VAR_POSITIONAL and value:
            raise LoraFxError(f"{where}: forward takes *{name}, which lorafx cannot map onto "
                              "a captured graph: pass the inputs as named arguments")
    return Call(tuple(names), tuple(values), extras)


def stateful(call: Call) -> str | None:
    """The first argument of ``call`` that no captured graph takes or gives back: an object
    that is neither a tensor nor a constant (a KV cache), or ``use_cache=True`` (which asks
    the model to return one); None when there is none."""
    for name, value in call.arguments().items():
        if (name == "use_cache" and value is True) or _opaque(value):
            return name
    return None


def _opaque(value: Any) -> bool:
    if isinstance(value, (torch.Tensor, *_CONSTANTS)):
        return False
    if isinstance(value, (list, tuple)):
        return any(_opaque(v) for v in value)
    if isinstance(value, dict):
        return any(_opaque(v) for v in value.values())
    return True


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    return isinstance(a, _CONSTANTS) and type(a) is type(b) and a == b


def pattern(call: Call, graph: fx.Graph | None) -> Pattern:
    """What ``graph`` (captured from ``call``'s arguments) takes, per argument: its pytree
    structure and leaves, a TensorSlot per tensor (fixed axes from its placeholder, every axis
    when unknown), the value of every other leaf."""
    found = [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"] if graph else []
    vals = iter([v for v in found if isinstance(v, torch.Tensor)])
    args = call.arguments()
    count = sum(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(list(args.values())))
    known = count == sum(isinstance(v, torch.Tensor) for v in found)
    out: Pattern = {}
    for name, value in args.items():
        leaves, spec = pytree.tree_flatten(value)
        slots: list[Any] = []
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                slots.append(leaf)
                continue
            val = next(vals) if known else None
            sizes = tuple(d if isinstance(d, int) else None for d in val.shape) \
                if val is not None else tuple(leaf.shape)
            slots.append(TensorSlot(leaf.dtype, sizes))
        out[name] = (spec, tuple(slots))
    return out


def fits(want: Pattern, call: Call) -> bool:
    """Whether ``call`` has the kinds of arguments that the capture ``want`` takes."""
    args = call.arguments()
    if set(args) != set(want):
        return False
    for name, value in args.items():
        spec, slots = want[name]
        leaves, got = pytree.tree_flatten(value)
        if got != spec:
            return False
        for slot, leaf in zip(slots, leaves, strict=True):
            if isinstance(slot, TensorSlot):
                if not slot.accepts(leaf):
                    return False
            elif isinstance(leaf, torch.Tensor) or not _same(leaf, slot):
                return False
    return True
