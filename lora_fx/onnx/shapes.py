"""The axes an exported file keeps symbolic, and a second input shape to verify it on.

An ONNX file that declares a symbolic axis but computes with the example's size somewhere
(a shape baked into a Reshape or a Mul by a specialized trace) runs only at the example's
size: verifying on the example alone does not see it. ``second_shape`` makes inputs of another
batch (+1) and length (+3) on exactly the axes the file declares symbolic, by tiling the
example along them (so ids stay in the vocabulary and masks stay masks).
"""

from __future__ import annotations

from typing import Any

import torch

BATCH_STEP, LENGTH_STEP = 1, 3


def symbolic_axes(model: Any, count: int) -> list[list[int]] | None:
    """For the first ``count`` graph inputs of an ``onnx_ir.Model``, the axes whose size is
    not a number; None when the graph has fewer inputs or a shape is unknown."""
    inputs = list(model.graph.inputs)[:count]
    if len(inputs) < count or any(v.shape is None for v in inputs):
        return None
    return [[i for i, d in enumerate(v.shape) if not isinstance(d, int)] for v in inputs]


def fixed_axes(model: Any) -> dict[str, list[int]]:
    """Input name → its batch axis (0) and, for token inputs (integers), length axis (1) when
    the file fixes them to a size (an image's channels are fixed by nature: not listed)."""
    out: dict[str, list[int]] = {}
    for v in model.graph.inputs:
        if v.shape is None or v.const_value is not None:  # adapter inputs: not data
            continue
        floating = v.dtype is not None and v.dtype.is_floating_point()
        axes = 1 if floating else 2
        fixed = [i for i, d in enumerate(v.shape) if i < axes and isinstance(d, int)]
        if fixed:
            out[v.name] = fixed
    return out


def resized(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """``t`` tiled along ``axis`` to at least ``size``, then cut to ``size``."""
    reps = [1] * t.dim()
    reps[axis] = -(-size // max(t.shape[axis], 1))
    return t.repeat(*reps).narrow(axis, 0, size)


def second_shape(args: tuple[Any, ...], axes: list[list[int]], length: bool = True
                 ) -> tuple[Any, ...] | None:
    """``args`` with each symbolic axis grown: axis 0 by BATCH_STEP, the others by
    LENGTH_STEP (``length=False``: the batch only); None when nothing is symbolic."""
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    if len(tensors) != len(axes) or not any(axes):
        return None
    out = list(args)
    for index, dims in zip(tensors, axes, strict=True):
        t = out[index]
        for axis in dims:
            step = BATCH_STEP if axis == 0 else LENGTH_STEP if length else 0
            if step:
                t = resized(t, axis, t.shape[axis] + step)
        out[index] = t
    return tuple(out)


def shape_text(args: tuple[Any, ...]) -> str:
    """The first tensor's shape as ``3x11``."""
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    return "x".join(map(str, first.shape)) if first is not None else "()"
