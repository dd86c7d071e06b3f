"""Forms: how an export replaces LoRA branches, and what it carries of the adapter.

- ``Merged``: W' = W + s·B@A folded into every site's weight in fp32, cast once
  (``model.merge``): the file is the base model's graph with new weights.
- ``Unmerged``: each branch becomes Add(y, MatMul(MatMul(x, A'), B')) with A' = Aᵀ,
  B' = s·Bᵀ overridable inputs (``onnx.unmerged``); a target that writes the adapter file beside
  the model (the KV decoder) gets zero defaults (Δ = 0: the base model until an adapter is made
  active) and the file's A', B' computed once, before any other work.
- ``Mixed``: per site the stacks A[k] = A_kᵀ, B[k] = s_k·B_kᵀ (row 0 zero) gathered by the
  ``adapter_ids`` input row by row (``onnx.mixed_batch``).

``build`` gives a ``Built``: what is traced, on which inputs, and the fp32 PyTorch functions the
file's outputs must equal (``reference``) and, where an adapter runs, the outputs without it
(``base``), which bound the verification limit (``onnx.limits``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import fx, nn

from .. import memory
from ..adapter.peft import Adapter
from ..capture.dynamic import auto_dynamic, widened
from ..capture.program import captured_program
from ..deploy_format import A_SUFFIX, B_SUFFIX
from ..graph.attrs import set_attr_cow
from ..graph.state import get_state
from ..model.adapters import to_adapter
from ..model.merge import without_branches
from ..ort.adapters import onnx_params
from .mixed_batch import MixedBatch, example_ids, mixed_module
from .mixed_program import batch_of, checked_outputs, mixed_program
from .outputs import name_outputs, output_names
from .prepare import Prepared, cast_inputs, prepare
from .trace import to_onnx
from .unmerged import branch_paths, export_unmerged
from .verify import forward

if TYPE_CHECKING:
    from .targets import Target

Outputs = Callable[[tuple[Any, ...]], list[torch.Tensor]]
MaybeOutputs = Callable[[tuple[Any, ...]], list[torch.Tensor] | None]
AdapterSource = str | Path | Adapter
AdapterSet = Mapping[str, AdapterSource] | Sequence[str | Path]


@dataclass
class Built:
    """What a form made of a target: the module traced and its inputs, and the fp32 PyTorch
    outputs the file must equal (``reference``) and those without the adapter (``base``)."""

    module: nn.Module
    args: tuple[Any, ...]                   # the traced module's inputs (cast when lowered)
    reference: Outputs                      # target inputs → fp32 outputs to equal
    base: MaybeOutputs | None               # target inputs → fp32 outputs without the adapter
    merged: bool = False
    unmerged: bool = False
    ids: torch.Tensor | None = None         # a mixed batch: the example's adapter per row
    names: list[str] = field(default_factory=list)             # a mixed batch: ids → names
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # the adapter file's A', B'
    dtype: str = "fp32"
    owned: list[nn.Module] = field(default_factory=list)      # freed by ``release``

    def call_args(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """The traced module's call on ``args``: a mixed batch appends the ids."""
        return args if self.ids is None else (*args, self.ids)

    def feeds(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """The file's inputs for fp32 target inputs ``args``: cast to the file's precision."""
        cast = args if self.dtype == "fp32" else cast_inputs(args, self.dtype)
        return self.call_args(cast)

    def release(self) -> None:
        release_weights(*self.owned)


class Form(Protocol):
    name: str

    def build(self, target: Target, precision: str, verify: bool, release: bool) -> Built: ...

    def trace(self, built: Built, target: Target, opset: int | None, release: bool
              ) -> tuple[Any, dict[str, dict[str, int]]]: ...


def _outputs(module: nn.Module) -> Outputs:
    return lambda args: forward(module, args)


def _remembered(module: nn.Module, args: tuple[Any, ...], later: bool) -> MaybeOutputs:
    """``module``'s outputs, those on ``args`` computed now (before an in-place merge changes
    the weights ``module`` shares); on other inputs only where ``later`` (no such merge)."""
    known = forward(module, args)
    return lambda a: known if a is args else (forward(module, a) if later else None)


@dataclass
class Merged:
    """W' = W + s·B@A folded (or the base model where there is no adapter)."""

    adapter: AdapterSource | None = None
    name: str = "merged"

    def build(self, target: Target, precision: str, verify: bool, release: bool) -> Built:
        gm = target.injected(self.adapter)
        base = without_branches(gm) if get_state(gm) is not None else None
        without = _remembered(base, target.args, not release) \
            if verify and base is not None else None
        prep = prepare(gm, target.args, True, precision, target.eager, target.dynamic_shapes,
                       inplace=release)
        owned = [gm, prep.reference, prep.module, *target.owned()]
        return Built(prep.module, prep.args, _outputs(prep.reference), without,
                     merged=base is not None, dtype=precision, owned=owned)

    def trace(self, built: Built, target: Target, opset: int | None, release: bool
              ) -> tuple[Any, dict[str, dict[str, int]]]:
        return _trace(built, target, opset, release)


@dataclass
class Unmerged:
    """Branches kept as MatMul(MatMul(x, A'), B') with A', B' overridable inputs."""

    adapter: AdapterSource | None = None
    name: str = "unmerged"

    def build(self, target: Target, precision: str, verify: bool, release: bool) -> Built:
        gm = target.injected(self.adapter)
        if get_state(gm) is None:  # nothing to keep unmerged: the base model
            return Merged(None).build(target, precision, verify, release)
        # the adapter file's factors, refused (DoRA, modules_to_save, ...) before any work
        params = onnx_params(to_adapter(gm), precision, str(self.adapter)) \
            if target.writes_adapter_file else {}
        prep = prepare(gm, target.args, False, precision, target.eager, target.dynamic_shapes,
                       inplace=False)
        if params:
            zero_defaults(prep.module)
        base = without_branches(gm)
        return Built(prep.module, prep.args, _outputs(prep.reference),
                     _outputs(base) if verify else None, unmerged=True, params=params,
                     dtype=precision, owned=[gm, prep.module, *target.owned()])

    def trace(self, built: Built, target: Target, opset: int | None, release: bool
              ) -> tuple[Any, dict[str, dict[str, int]]]:
        return _trace(built, target, opset, release)


def _trace(built: Built, target: Target, opset: int | None, release: bool
           ) -> tuple[Any, dict[str, dict[str, int]]]:
    """The ONNXProgram of a merged or unmerged build: the capture's own program where the
    target allows it (no second trace), else traced with the target's dynamic shapes."""
    dtype = None if built.dtype == "fp32" else built.dtype
    prep = Prepared(built.module, built.module, built.args, built.unmerged, dtype)
    reuse = dtype is None and not built.unmerged and captured_program(built.module) is not None
    program, extras = trace(prep, target.trace_shapes(reuse), opset, release)
    return program, extras.get("lora_inputs", {})


@dataclass
class Mixed:
    """An adapter per batch row: the stacks of ``adapters`` (id k = k-th, 0 = the base)."""

    adapters: AdapterSet
    name: str = "mixed"

    def build(self, target: Target, precision: str, verify: bool, release: bool) -> Built:
        base_model = target.injected(None)
        mixed = mixed_module(base_model, target.args, self.adapters, target.dynamic_shapes)
        ids = example_ids(batch_of(target.args), len(mixed.names) - 1)
        if verify:
            checked_outputs(mixed, target.args, ids)  # the batch-major check
        traced: MixedBatch = mixed
        args = target.args
        if precision != "fp32":
            args = cast_inputs(target.args, precision)
            traced = mixed_module(target.lowered(precision, args), args, self.adapters,
                                  target.dynamic_shapes, precision)
        zeros = torch.zeros_like(ids)  # every row on id 0: no adapter
        return Built(traced, args, lambda a: forward(mixed, (*a, ids)),
                     lambda a: forward(mixed, (*a, zeros)), ids=ids, names=mixed.names,
                     dtype=precision, owned=[])

    def trace(self, built: Built, target: Target, opset: int | None, release: bool
              ) -> tuple[Any, dict[str, dict[str, int]]]:
        assert isinstance(built.module, MixedBatch) and built.ids is not None
        return mixed_program(built.module, built.args, built.ids, target.dynamic_shapes, opset)


def trace(prep: Prepared, dynamic_shapes: Any, opset: int | None, release: bool
          ) -> tuple[Any, dict[str, Any]]:
    """The ONNXProgram of ``prep.module``, and the report's extras. A merged or base
    module whose graph is still the captured one reuses the capture's program (no second
    trace); every other module is traced with ``dynamic_shapes`` (default: Dim.AUTO on every
    axis of a GraphModule's inputs)."""
    reuse = None if prep.unmerged or prep.dtype is not None or dynamic_shapes is not None \
        else captured_program(prep.module)
    args = prep.args
    if dynamic_shapes is None and isinstance(prep.module, fx.GraphModule):
        args = widened(args) or args  # a batch-1 example would fix the batch (capture.dynamic)
        dynamic_shapes = auto_dynamic(args)
    extras: dict[str, Any] = {}
    # frozen: faster; not when memory is what counts (release): garbage made before the export
    # (the merge's) would stay through its peak
    with nullcontext() if release else memory.collector_frozen():
        if prep.unmerged:
            program, extras["lora_inputs"] = export_unmerged(prep.module, args,
                                                             dynamic_shapes, opset)
        elif reuse is not None:
            program = to_onnx(reuse, (), opset=opset)
        else:
            program = to_onnx(prep.module, args, dynamic_shapes, opset)
    name_outputs(program.model, output_names(reuse if reuse is not None else prep.module))
    return program, extras


def zero_defaults(deploy: nn.Module) -> nn.Module:
    """``deploy`` (a ``deploy_module``) with every A' and B' zero (Δ = 0: the base model when
    no adapter is active); shapes, and so the exported ranks, kept."""
    for path in branch_paths(deploy).values():
        for key in (path + A_SUFFIX, path + B_SUFFIX):
            value = deploy.get_parameter(key)
            set_attr_cow(deploy, key, nn.Parameter(torch.zeros_like(value),
                                                   requires_grad=False))
    return deploy


def release_weights(*modules: nn.Module) -> None:
    """Free the memory of every parameter and buffer of ``modules`` (each becomes an empty
    tensor of its dtype): anything sharing them, the user's model included, cannot run after."""
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
