"""Stage 1 of an export: prepare what is traced and what it must equal.

Merged: W' = W + s·B@A folded first (``model.merge``), so the file's graph is the base model's.
Unmerged: each branch becomes ``OnnxBranch`` (``onnx.unmerged``). fp16/bf16 (``lowered``): merged
or converted in fp32 first, every floating weight cast once; the reference stays fp32, so the
file's error against fp32 can be reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ..capture.recapture import eager_model
from ..capture.trace import CAPTURE_KEY, capture
from ..deploy_format import DTYPES, torch_dtype
from ..errors import LoraFxError
from ..graph.attrs import set_attr_cow
from ..graph.copy import shallow_copy
from ..graph.state import get_state
from ..model.adapters import apply_adapter, to_adapter
from ..model.merge import merge
from .unmerged import deploy_module


@dataclass
class Prepared:
    """What one export traces and checks against."""

    reference: nn.Module     # fp32 PyTorch whose outputs the file must equal (merged, or gm)
    module: nn.Module        # what is traced: the reference, its deploy form, or a lowered copy
    args: tuple[Any, ...]    # the module's example inputs (floating ones cast when lowered)
    unmerged: bool
    dtype: str | None        # None for fp32


def prepare(gm: nn.Module, example_inputs: tuple[Any, ...], merge_branches: bool,
            dtype: str | None, model: nn.Module | None, dynamic_shapes: Any,
            inplace: bool) -> Prepared:
    """The export's module, inputs and fp32 reference. ``inplace``: an fp32 merge folds W' into
    each weight's own storage (``merge(inplace=True)``, for models too big for two copies)."""
    dtype = None if dtype in (None, "fp32") else dtype
    state = get_state(gm)
    unmerged = not merge_branches and state is not None
    reference: nn.Module = merge(gm, inplace=inplace and dtype is None) \
        if merge_branches and state is not None else gm
    module, args = reference, tuple(example_inputs)
    if unmerged:
        module = deploy_module(gm)
    if dtype is not None:
        args = cast_inputs(args, dtype)
        module = lowered(gm, module, unmerged, dtype, args, model, dynamic_shapes)
    return Prepared(reference, module, args, unmerged, dtype)


def lowered(gm: nn.Module, module: nn.Module, unmerged: bool, dtype: str,
            args: tuple[Any, ...], model: nn.Module | None, dynamic_shapes: Any) -> nn.Module:
    """``module`` (``gm`` merged in fp32, or its deploy form) with its weights cast once.

    A symbolic-trace capture or plain module is cast in a copy. A torch.export capture is
    specialized to fp32 (``to(float32)`` for ``to(x.dtype)``, metadata asserts), so the eager
    ``model`` it came from is cast and captured again, as the model's code intends (fp32
    upcasts such as RMSNorm's and rotary's stay fp32), and ``gm``'s merged site weights,
    modules_to_save and branches (A', B' computed in fp32) are carried over.
    """

    if not (isinstance(gm, fx.GraphModule) and gm.meta.get(CAPTURE_KEY) == "export"):
        return cast_module(module, dtype)
    model = model if model is not None else eager_model(gm)  # the capture's own skeleton
    if model is None:
        raise LoraFxError(f"a {dtype} export of a torch.export capture needs the eager model: "
                          "pass model= (the module the GraphModule was captured from)")
    low = cast_module(model, dtype)
    state = get_state(gm)
    if state is None:
        return capture(low, args, dynamic_shapes)
    for name in state.saved:
        set_attr_cow(low, name, cast_module(gm.get_submodule(name), dtype))
    if unmerged:
        low_gm = apply_adapter(low, args, to_adapter(gm), dynamic_shapes)
        return deploy_module(low_gm, source=gm, dtype=DTYPES[dtype])
    for rec in state.sites.values():
        weight = module.get_parameter(rec.weight).detach().to(DTYPES[dtype])
        set_attr_cow(low, rec.weight, nn.Parameter(weight, requires_grad=False))
    return capture(low, args, dynamic_shapes)


def cast_module(module: nn.Module, dtype: str) -> nn.Module:
    """A copy of ``module`` whose floating parameters and buffers are cast once to ``dtype``
    (tied tensors stay tied); ``module`` and the user's model keep theirs (copy-on-write).
    """

    target = torch_dtype(dtype)
    new = shallow_copy(module)
    cast: dict[int, torch.Tensor] = {}
    named = [*new.named_parameters(remove_duplicate=False),
             *new.named_buffers(remove_duplicate=False)]
    for name, t in named:
        if not t.is_floating_point() or t.dtype == target:
            continue
        if id(t) not in cast:
            low = t.detach().to(target)
            cast[id(t)] = nn.Parameter(low, requires_grad=False) \
                if isinstance(t, nn.Parameter) else low
        set_attr_cow(new, name, cast[id(t)])
    return new


def cast_inputs(args: tuple[Any, ...], dtype: str) -> tuple[Any, ...]:
    """Floating tensor inputs cast to ``dtype``, inside lists too (a KV cache); integer ones
    (token ids, masks) unchanged."""
    target = DTYPES[dtype]

    def cast(a: Any) -> Any:
        if isinstance(a, (list, tuple)):
            return type(a)(cast(x) for x in a)
        return a.to(target) if isinstance(a, torch.Tensor) and a.is_floating_point() else a

    return tuple(cast(a) for a in args)
