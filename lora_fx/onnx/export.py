"""Export orchestration: prepare (merged / unmerged / lowered) → trace or reuse → save → verify.

Merged export: W' = W + s·B@A folded first, so the file's op histogram is the base model's.
Models past 2 GB get external data. Unmerged export: see ``onnx.unmerged``. ``dtype``
fp16/bf16: merge in fp32, cast once, report the error against fp32.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from .. import memory
from ..capture.dynamic import auto_dynamic, widened
from ..capture.program import captured_program
from ..deploy_format import torch_dtype
from ..graph.state import get_state
from ..model.merge import without_branches
from .outputs import name_outputs, output_names
from .prepare import Prepared, cast_inputs, prepare
from .report import ExportReport, op_histogram
from .rules import forget_rewriter_state
from .save import save_program
from .shapes import fixed_axes
from .trace import to_onnx
from .unmerged import export_unmerged
from .verify import forward, second_case, torch_max_diff, verify_file


def export_onnx(gm: nn.Module, example_inputs: tuple[Any, ...], path: str | Path,
                merge: bool = True, opset: int | None = None, verify: bool = True,
                dynamic_shapes: Any = None, atol: float | None = None,
                providers: list[str] | None = None, dtype: str | None = None,
                model: nn.Module | None = None, release: bool = False) -> ExportReport:
    """Export ``gm`` (an injected GraphModule, or any module) to ONNX at ``path``.

    ``merge=True`` folds every branch first (the file is the base model's graph with new
    weights); ``merge=False`` keeps each branch as MatMul(x, A')→MatMul(·, B')→Add with A', B'
    as ONNX Runtime adapter inputs (``onnx.unmerged``). ``verify`` compares ONNX Runtime's
    outputs with PyTorch's on ``example_inputs`` and another shape, and raises LoraFxError
    above the limit of ``onnx.limits`` (``atol``: its absolute part, the precision's own by
    default), which an adapter's own effect bounds too (PyTorch without the branches).
    ``dtype`` "fp16"/"bf16": merge in fp32, cast every floating weight once (see ``lowered``:
    a torch.export capture also needs the eager ``model``); ``extras["error_vs_fp32"]`` holds
    max |y − y_fp32| of PyTorch and ONNX Runtime.

    ``release=True`` (models too big for two copies) consumes the model: an fp32 merge folds
    W' into each weight's own storage (``merge(inplace=True)``: no second copy), and after the
    export PyTorch's outputs are kept, every weight of ``gm`` (and so of the user's model, which
    shares them) is freed, then ONNX Runtime verifies; the model cannot run afterwards.
    """
    if dtype is not None:
        torch_dtype(dtype)  # refuses an unknown dtype before any work
    start = time.perf_counter()
    base = without_branches(gm) if verify and get_state(gm) is not None else None
    base_want = forward(base, example_inputs) if base is not None else None  # before a merge
    prep = prepare(gm, example_inputs, merge, dtype, model, dynamic_shapes, inplace=release)
    program, extras = trace(prep, dynamic_shapes, opset, release)
    memory.trim()  # what tracing and translating freed: not resident while saving
    external, layout = save_program(program, Path(path))
    report = ExportReport(Path(path), merge, 0.0, external, dict(op_histogram(program.model)),
                          extras=extras)
    report.extras["fixed_axes"] = fixed_axes(program.model)
    more = second_case(program.model, prep.reference, example_inputs,
                       lambda a: cast_inputs(a, prep.dtype) if prep.dtype else a,
                       None if release else base) if verify else None
    del program  # its IR may hold tensors of its own (folded constants): free them first
    forget_rewriter_state()
    if prep.dtype is not None:
        error = torch_max_diff(forward(prep.module, prep.args),
                               forward(prep.reference, example_inputs))
        report.extras.update(dtype=prep.dtype, error_vs_fp32={"pytorch": error})
    want = forward(prep.reference, example_inputs) if verify else None
    if release:
        release_weights(gm, prep.reference, prep.module, *([model] if model else []))
        memory.trim()
    if want is not None:
        verify_file(report, prep.args, want, atol, providers, prep.dtype, lean=release,
                    layout=layout, more=[more] if more else [], base=base_want)
    report.seconds = time.perf_counter() - start
    return report


def trace(prep: Prepared, dynamic_shapes: Any, opset: int | None, release: bool
          ) -> tuple[Any, dict[str, Any]]:
    """Stage 2: the ONNXProgram of ``prep.module``, and the report's extras. A merged or base
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


def release_weights(*modules: nn.Module) -> None:
    """Free the memory of every parameter and buffer of ``modules`` (each becomes an empty
    tensor of its dtype): anything sharing them, the user's model included, cannot run after."""
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
