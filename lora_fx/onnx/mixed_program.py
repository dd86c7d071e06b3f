"""The program of a mixed-batch model: base graph + per-row adapters chosen by ``adapter_ids``.

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
from collections.abc import Mapping
from typing import Any

import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import TorchTensor
from torch import nn

from ..deploy_format import (
    A_SUFFIX,
    B_SUFFIX,
    IDS_INPUT,
    NAMES_META,
    RANK_META,
)
from ..errors import LoraFxError
from ..graph.state import require_state
from .kv_cache import BATCH
from .mixed_batch import MixedBatch, MixedBranch, translation_table
from .trace import to_onnx
from .unmerged import rename_initializer, with_placeholders
from .verify import forward

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
    """``mixed`` with random stacks of the same shapes (``unmerged.with_placeholders``)."""
    keys = [path + key for path in _branches(mixed) for key in (A_SUFFIX, B_SUFFIX)]
    return MixedBatch(with_placeholders(mixed.model, keys), mixed.rows, mixed.names)


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


def name_inputs(model: Any, source: nn.Module, count: int) -> None:
    """The exporter names a ``*args`` forward's inputs ``args_i``: give them ``source``'s
    parameter names and the last one ``adapter_ids``."""
    params = [p.name for p in inspect.signature(source.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = {f"args_{i}": params[i] for i in range(min(count, len(params)))}
    names[f"args_{count}"] = IDS_INPUT
    for value in model.graph.inputs:
        if value.name in names:
            value.name = names[value.name]


def name_ids(model: Any, index: int) -> None:
    """The input after the KV decoder's: ``adapter_ids`` [batch_size]."""
    value = model.graph.inputs[index]
    value.name = IDS_INPUT
    value.shape = ir.Shape([ir.SymbolicDim(BATCH)])
