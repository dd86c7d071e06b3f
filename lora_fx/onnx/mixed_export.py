"""Export a mixed-batch model: base graph + per-row adapters chosen by ``adapter_ids``.

The file's inputs are the model's, then ``adapter_ids`` (int64 [batch]); per site the stacks
``<site>.lora_A.weight`` [n+1, in, r_max] and ``<site>.lora_B.weight`` [n+1, r_max, out]
(``ort.adapter_sets``) are initializers *and* inputs of the same name (overridable), with
symbolic n+1 and r axes, so a set file of any size and rank replaces them per run. As in the
unmerged export, the stacks are traced as random placeholders (the optimizer merges equal
initializers: the zero rows would otherwise become one shared tensor), then the ONNX IR gets
their names and values. The set's order goes to ``model.adapter_ids.json`` and metadata.

Batch-major check: the PyTorch outputs of the mixed example batch must equal, row by row, those
of the same batch run with every row on that row's adapter (where the grouping of rows cannot
matter). A site whose input does not keep the batch first would fail it.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import TorchTensor
from torch import nn

from ..adapter.peft import Adapter
from ..deploy_format import (
    A_SUFFIX,
    B_SUFFIX,
    IDS_INPUT,
    NAMES_META,
    RANK_META,
    torch_dtype,
    write_ids,
)
from ..errors import LoraFxError
from ..graph.attrs import set_attr_cow
from ..graph.copy import shallow_copy
from ..graph.state import require_state
from .mixed_batch import MixedBatch, MixedBranch, example_ids, mixed_module, translation_table
from .prepare import cast_inputs, lowered
from .report import ExportReport, op_histogram
from .rules import forget_rewriter_state
from .save import save_program
from .trace import to_onnx
from .unmerged import rename_initializer
from .verify import forward, torch_max_diff, verify_file


def export_mixed(model: nn.Module, example_inputs: tuple[Any, ...],
                 adapters: Mapping[str, str | Path | Adapter] | Sequence[str | Path],
                 path: str | Path, opset: int | None = None, verify: bool = True,
                 dynamic_shapes: Any = None, atol: float | None = None,
                 providers: list[str] | None = None, dtype: str | None = None) -> ExportReport:
    """Export base ``model`` with ``adapters`` (id k = k-th; directories named by their
    folder names, or a mapping name → directory / ``Adapter``) as one mixed-batch ONNX file.

    Every tensor input's axis 0 is the batch. ``verify``: ONNX Runtime against PyTorch on the
    example inputs with ids ``(i + 1) mod (n + 1)``, after the batch-major check.
    ``dtype`` "fp16"/"bf16": the model's weights and the stacks (A[k] = A_kᵀ, B[k] = s_k·B_kᵀ
    computed in fp32) cast once, the model captured again in that dtype (``prepare.lowered``);
    verified against the fp32 outputs within ``DTYPE_RTOL[dtype] · max(1, max |y|)``.
    ``extras``: ``adapters`` (names by id), ``ids_file``, ``lora_inputs`` {site: in, out, r};
    with ``dtype``: ``dtype`` and ``error_vs_fp32`` {"pytorch": max |Δ|}.
    """
    start = time.perf_counter()
    dtype = None if dtype == "fp32" else dtype
    if dtype is not None:
        torch_dtype(dtype)  # refuses an unknown dtype before any work
    args = tuple(example_inputs)
    mixed = mixed_module(model, args, adapters, dynamic_shapes)
    ids = example_ids(batch_of(args), len(mixed.names) - 1)
    want = checked_outputs(mixed, args, ids) if verify else None
    traced, traced_args, extras = (mixed, args, {}) if dtype is None else \
        lowered_mixed(model, args, adapters, dynamic_shapes, dtype, ids,
                      want if want is not None else forward(mixed, (*args, ids)))
    program, found = mixed_program(traced, traced_args, ids, dynamic_shapes, opset)
    _name_inputs(program.model, model, len(args))
    external, layout = save_program(program, Path(path))
    report = ExportReport(Path(path), False, 0.0, external, dict(op_histogram(program.model)),
                          extras={"adapters": mixed.names, "lora_inputs": found, **extras})
    del program
    forget_rewriter_state()
    report.extras["ids_file"] = str(write_ids(path, mixed.names))
    if want is not None:
        base = forward(mixed, (*args, torch.zeros_like(ids)))  # every row on id 0: no adapter
        verify_file(report, (*traced_args, ids), want, atol, providers, dtype, layout=layout,
                    base=base)
    report.seconds = time.perf_counter() - start
    return report


def lowered_mixed(model: nn.Module, args: tuple[Any, ...],
                  adapters: Mapping[str, str | Path | Adapter] | Sequence[str | Path],
                  dynamic_shapes: Any, dtype: str, ids: torch.Tensor,
                  reference: list[torch.Tensor]) -> tuple[MixedBatch, tuple[Any, ...],
                                                          dict[str, Any]]:
    """The mixed module of ``model`` cast to ``dtype`` (captured again: ``prepare.lowered``),
    stacks cast once; returns it, the cast inputs and ``{"dtype", "error_vs_fp32"}``, the
    error of its outputs on ``(*args, ids)`` against the fp32 ``reference``."""
    low_args = cast_inputs(args, dtype)
    low = lowered(model, model, False, dtype, low_args, None, dynamic_shapes)
    traced = mixed_module(low, low_args, adapters, dynamic_shapes, dtype)
    error = torch_max_diff(forward(traced, (*low_args, ids)), reference)
    return traced, low_args, {"dtype": dtype, "error_vs_fp32": {"pytorch": error}}


_BATCH = torch.export.Dim("batch")


def mixed_program(mixed: MixedBatch, args: tuple[Any, ...], ids: torch.Tensor,
                  dynamic_shapes: Any, opset: int | None) -> tuple[Any, dict[str, dict[str, int]]]:
    """The ONNXProgram of ``mixed`` on ``(*args, ids)``, its stacks exposed as inputs and its
    set order in the metadata; returns it and ``{site: {"in", "out", "r"}}``."""
    shapes = {"args": (*row_shapes(args, dynamic_shapes), {0: _BATCH})}
    program = to_onnx(_placeholders(mixed), (*args, ids), shapes, opset,
                      translations=translation_table())
    found = expose_stacks(program.model, mixed)
    program.model.metadata_props[NAMES_META] = json.dumps(mixed.names)
    return program, found


def row_shapes(args: tuple[Any, ...], dynamic_shapes: Any) -> list[Any]:
    """Each input's dynamic shapes (given, else every axis ``Dim.AUTO``) with axis 0 the one
    ``batch`` dim that ``adapter_ids`` shares; a list input (a KV cache) item by item."""
    given = list(dynamic_shapes) if isinstance(dynamic_shapes, (list, tuple)) else \
        [None] * len(args) if dynamic_shapes is None else None
    if given is None or len(given) != len(args):
        raise LoraFxError("mixed-batch export takes dynamic_shapes as a tuple with one entry "
                          "per example input (or None)")
    return [_row_shape(arg, spec) for arg, spec in zip(args, given, strict=True)]


def _row_shape(arg: Any, spec: Any) -> Any:
    if isinstance(arg, (list, tuple)):
        specs = spec if isinstance(spec, (list, tuple)) else [None] * len(arg)
        return [_row_shape(a, s) for a, s in zip(arg, specs, strict=True)]
    if not isinstance(arg, torch.Tensor):
        return None
    auto = torch.export.Dim.AUTO
    dims = dict(spec) if isinstance(spec, Mapping) else {i: auto for i in range(arg.dim())}
    return {**dims, 0: _BATCH}


def batch_of(args: tuple[Any, ...]) -> int:
    """The batch of the example inputs (axis 0 of every tensor), refused below 2."""
    sizes = {int(a.shape[0]) for a in args if isinstance(a, torch.Tensor) and a.dim()}
    if len(sizes) != 1:
        raise LoraFxError(f"mixed-batch export needs every tensor input to have the batch on "
                          f"axis 0, but their first axes are {sorted(sizes)}")
    batch = sizes.pop()
    if batch < 2:
        raise LoraFxError("mixed-batch export needs example inputs of batch >= 2 (a batch of "
                          "1 pins the batch axis): give example inputs with 2 or more rows")
    return batch


def checked_outputs(mixed: MixedBatch, args: tuple[Any, ...],
                    ids: torch.Tensor) -> list[torch.Tensor]:
    """PyTorch's outputs for ``ids``, after checking each row equals the same row run with all
    rows on its adapter (the batch-major check, see the module docstring)."""
    got = forward(mixed, (*args, ids))
    for k in sorted(set(ids.tolist())):
        alone = forward(mixed, (*args, torch.full_like(ids, k)))
        rows = ids == k
        for g, a in zip(got, alone, strict=True):
            if g.dim() and g.shape[0] == ids.shape[0] and g.is_floating_point():
                err = float((g[rows].double() - a[rows].double()).abs().max())
                if err > 1e-4 * max(1.0, float(a.abs().max())):
                    raise LoraFxError(f"a mixed batch mixes rows (max |Δ| {err:.3g} against "
                                      f"adapter {k} alone): some LoRA site of this model does "
                                      "not keep the batch on axis 0; export it per adapter")
    return got


def _placeholders(mixed: MixedBatch) -> MixedBatch:
    """``mixed`` with random stacks of the same shapes (see the module docstring)."""
    model = shallow_copy(mixed.model)
    gen = torch.Generator().manual_seed(0)
    for path in _branches(mixed):
        for key in (A_SUFFIX, B_SUFFIX):
            real = mixed.model.get_parameter(path + key)
            fake = torch.randn(real.shape, generator=gen).to(real.dtype)
            set_attr_cow(model, path + key, nn.Parameter(fake, requires_grad=False))
    return MixedBatch(model, mixed.rows, mixed.names)


def _branches(mixed: MixedBatch) -> dict[str, MixedBranch]:
    return {name: m for name, m in mixed.model.named_modules() if isinstance(m, MixedBranch)}


def expose_stacks(model: Any, mixed: MixedBatch) -> dict[str, dict[str, int]]:
    """Rename each branch's stacks to ``<site>.lora_A/B.weight``, give them their values, add
    them as inputs with symbolic n+1 and r axes; check Gather → MatMul → Gather → MatMul."""
    graph = model.graph
    taken = {v.name for v in graph.inputs} | set(graph.initializers)
    n_dim = ir.SymbolicDim("adapters")
    found: dict[str, dict[str, int]] = {}
    for site, rec in require_state(mixed.model).sites.items():
        path = f"model.{rec.branch}"
        a = rename_initializer(graph, path + A_SUFFIX, site + A_SUFFIX, taken)
        b = rename_initializer(graph, path + B_SUFFIX, site + B_SUFFIX, taken)
        for value in (a, b):
            real = mixed.model.get_parameter(rec.branch + value.name[len(site):])
            value.const_value = TorchTensor(real.detach().contiguous(), name=value.name)
        for hidden in _check_branch(site, a, b):
            hidden.shape = None  # their r (and n) axes vary with the set: inferred at run time
        (_, d_in, rank), d_out = a.shape.numpy(), b.shape.numpy()[-1]
        r_dim = ir.SymbolicDim(f"{site}.lora_r")
        a.shape = ir.Shape([n_dim, d_in, r_dim])
        b.shape = ir.Shape([n_dim, r_dim, d_out])
        graph.inputs.extend([a, b])
        found[site] = {"in": int(d_in), "out": int(d_out), "r": int(rank)}
    model.metadata_props[RANK_META] = json.dumps(
        {s: [f["in"], f["out"], f["r"]] for s, f in found.items()}, sort_keys=True)
    return found


def _check_branch(site: str, a: Any, b: Any) -> list[Any]:
    """[Gather(A) output, x·A, Gather(B) output] (the values whose r or n axis varies with
    the set), after checking MatMul(MatMul(x, Gather(A, ids)), Gather(B, ids))."""
    gathered = [_gathered(site, value) for value in (a, b)]
    first = [u.node for u in gathered[0].uses()]
    second = [u.node for u in gathered[1].uses()]
    if first[0].outputs[0] is not second[0].inputs[0]:
        raise LoraFxError(f"internal error: the branch of site {site!r} is not MatMul(MatMul("
                          "x, Gather(A)), Gather(B)) in ONNX; please report it with the model")
    return [gathered[0], first[0].outputs[0], gathered[1]]


def _gathered(site: str, value: Any) -> Any:
    """The output of the one Gather reading ``value``, itself read by one MatMul only."""
    bad = f"internal error: the branch of site {site!r} is not Gather → MatMul in ONNX"
    users = [u.node for u in value.uses()]
    if len(users) != 1 or users[0].op_type != "Gather" or users[0].inputs[0] is not value:
        raise LoraFxError(f"{bad} ({value.name} is read by {[n.op_type for n in users]})")
    out = users[0].outputs[0]
    mm = [u.node for u in out.uses()]
    if len(mm) != 1 or mm[0].op_type != "MatMul" or mm[0].inputs[1] is not out:
        raise LoraFxError(f"{bad} (the gathered {value.name} is read by "
                          f"{[n.op_type for n in mm]})")
    return out


def _name_inputs(model: Any, source: nn.Module, count: int) -> None:
    """The exporter names a ``*args`` forward's inputs ``args_i``: give them ``source``'s
    parameter names and the last one ``adapter_ids``."""
    params = [p.name for p in inspect.signature(source.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = {f"args_{i}": params[i] for i in range(min(count, len(params)))}
    names[f"args_{count}"] = IDS_INPUT
    for value in model.graph.inputs:
        if value.name in names:
            value.name = names[value.name]
