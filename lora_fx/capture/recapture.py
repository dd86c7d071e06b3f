"""Capture again for a new dtype: the eager model, over a captured module's own tensors.

A torch.export graph is specialized to the dtypes it saw: a deliberate ``to(float32)``
(RMSNorm's upcast) and a ``to(input_dtype)`` that was fp32 at capture are the same node. When
the module's tensors are cast (``gm.to(torch.bfloat16)``, see ``graph.portable``) the eager
model is captured again, so its code decides each cast as it does eagerly. That model is a
view of the model's skeleton (kept at capture, no weights) whose parameters and buffers are the
module's own (cast, moved, merged or trained), so the new graph reads exactly the module's
tensors; the user's model is neither kept alive nor modified.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ..errors import LoraFxError
from ..graph.attrs import set_attr_cow
from ..graph.copy import shallow_copy
from ..graph.portable import DTYPES_KEY, INPUTS_KEY, REBUILD_KEY, float_dtypes

SOURCE_KEY = "lorafx_source"  # gm.meta[SOURCE_KEY]: Source, what a capture came from


@dataclass(frozen=True)
class Source:
    """The eager model a graph was captured from, as a skeleton (its code and module tree with
    every parameter and buffer on the meta device: no second copy of the weights is kept), and
    how it was captured (the example inputs live in ``meta[INPUTS_KEY]``: they follow ``.to``)."""

    skeleton: nn.Module
    dynamic_shapes: Any
    capture: Callable[[nn.Module, tuple[Any, ...], Any], fx.GraphModule]


def remember(gm: fx.GraphModule, model: nn.Module, example_inputs: tuple[Any, ...],
             dynamic_shapes: Any, capture: Callable[..., fx.GraphModule]) -> None:
    """Record on ``gm`` what a later dtype change needs to capture it again."""
    gm.meta[SOURCE_KEY] = Source(skeleton(model), dynamic_shapes, capture)
    gm.meta[INPUTS_KEY] = tuple(example_inputs)
    gm.meta[DTYPES_KEY] = float_dtypes(gm)
    gm.meta[REBUILD_KEY] = recapture


def skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are meta tensors (ties kept);
    ``model`` itself where it cannot be deep-copied."""
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        empty = t.detach().to("meta")
        memo[id(t)] = nn.Parameter(empty, t.requires_grad) if isinstance(t, nn.Parameter) \
            else empty
    try:
        return copy.deepcopy(model, memo)
    except Exception:  # noqa: BLE001 - an attribute deepcopy refuses: keep the model itself
        return model


def carry(src: fx.GraphModule, dst: fx.GraphModule) -> None:
    """Give ``dst`` (a copy of ``src``'s graph: merged, deployed) what a rebuild needs."""
    for key in (SOURCE_KEY, INPUTS_KEY, DTYPES_KEY):
        if key in src.meta:
            dst.meta[key] = src.meta[key]
    if SOURCE_KEY in src.meta:
        dst.meta[REBUILD_KEY] = recapture


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False)]


def model_over(model: nn.Module, gm: nn.Module) -> nn.Module:
    """A view of ``model`` whose every parameter and buffer is ``gm``'s tensor of that path
    (a tensor ``model`` ties under several paths is replaced under all of them)."""
    mine = dict(_tensors(gm))
    named = _tensors(model)
    by_id = {id(t): mine[name] for name, t in named if name in mine}
    view = shallow_copy(model)
    for name, t in named:
        new = by_id.get(id(t))
        if new is None and t.is_meta and not all(x.is_meta for x in mine.values()):
            raise LoraFxError(f"cannot capture the model again: its tensor {name!r} is not in "
                              "the captured module; cast the model before capturing it")
        if new is not None and new is not t:
            set_attr_cow(view, name, new)
    return view


def eager_model(gm: nn.Module) -> nn.Module | None:
    """The eager model ``gm`` was captured from, over ``gm``'s own tensors (None if unknown)."""
    source = getattr(gm, "meta", {}).get(SOURCE_KEY)
    return model_over(source.skeleton, gm) if isinstance(source, Source) else None


def recapture(gm: fx.GraphModule) -> fx.GraphModule:
    """The base capture of ``gm``'s eager model in ``gm``'s current dtypes and devices."""
    source = gm.meta.get(SOURCE_KEY)
    if not isinstance(source, Source):
        raise LoraFxError("this graph keeps no eager model to capture again: cast the model "
                          "before capturing it")
    return source.capture(model_over(source.skeleton, gm), gm.meta[INPUTS_KEY],
                          source.dynamic_shapes)
