"""ONNX for grouped expert matmuls: ``lorafx::grouped_mm`` (``capture.grouped``),
``transformers::grouped_mm_fallback`` and ``aten._grouped_mm``.

transformers' ``grouped_mm`` experts (``capture.experts``) sort the routed (token, expert) rows
by expert and multiply row block e, rows [offs[e-1], offs[e]), by expert e's weight:

    y[i] = x[i] @ W[e(i)],   e(i) = #{e : offs[e] <= i}   (clamped to E - 1)

for x [S, k], W [E, k, m] and the cumulative row counts offs [E]. ONNX has no grouped matmul,
so the translation computes each row's expert e(i) from the offsets and multiplies the row by its
gathered weight: Range → GreaterOrEqual(rows, offs) → ReduceSum → Min(E - 1) → Gather(W) →
MatMul, the same per-row product transformers' ``batched_mm`` makes (no data-dependent shape).
"""

from __future__ import annotations

from typing import Any

import torch
from onnxscript import INT64, opset18

from .. import grouped_mm as _registers_op  # noqa: F401 - registers lorafx::grouped_mm

op: Any = opset18  # the stubs type each op's inputs narrowly; the exporter traces any value


def _ints(*values: int) -> Any:
    return op.Constant(value_ints=list(values))


def grouped_mm_onnx(x: Any, w: Any, offs: Any = None, bias: Any = None,
                    out_dtype: Any = None) -> Any:
    """y[i] = x[i] @ W[e(i)] with e(i) the expert block of row i (see the module docstring)."""
    rows = op.Range(op.Constant(value_int=0), op.Squeeze(op.Shape(x, start=0, end=1)),
                    op.Constant(value_int=1))
    ends = op.Unsqueeze(op.Cast(offs, to=INT64.dtype), _ints(0))
    passed = op.GreaterOrEqual(op.Unsqueeze(rows, _ints(1)), ends)  # [S, E]: row i past block e
    ids = op.ReduceSum(op.Cast(passed, to=INT64.dtype), _ints(1), keepdims=0)
    ids = op.Min(ids, op.Sub(op.Shape(w, start=0, end=1), _ints(1)))
    y = op.Squeeze(op.MatMul(op.Unsqueeze(x, _ints(1)), op.Gather(w, ids, axis=0)), _ints(1))
    return y if bias is None else op.Add(y, op.Gather(bias, ids, axis=0))


def translation_table() -> dict[Any, Any]:
    """The grouped matmul ops this torch build (and transformers, where imported) registers →
    their ONNX translation."""
    table: dict[Any, Any] = {}
    grouped = getattr(torch.ops.aten, "_grouped_mm", None)
    if grouped is not None:
        table[grouped.default] = grouped_mm_onnx
    table[torch.ops.lorafx.grouped_mm.default] = grouped_mm_onnx  # lora_fx.grouped_mm
    try:
        table[torch.ops.transformers.grouped_mm_fallback.default] = grouped_mm_onnx
    except (AttributeError, RuntimeError):  # transformers' MoE ops are not loaded
        pass
    return table
