"""Dynamic shapes for torch.export: Dim.AUTO on every axis the caller did not pin, and example
inputs that do not pin the batch.

torch.export specializes an axis whose example size is 1 (the 0/1 specialization): a batch-1
example gives a graph, and an ONNX file, of batch 1 only. ``widened`` makes such an example
batch 2 by repeating it (rows of a batch are independent), for tracing only; outputs are
checked on the caller's own inputs.
"""

from __future__ import annotations

from typing import Any

import torch


def auto_dynamic(example_inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """Dim.AUTO on every axis of every tensor input: export keeps what it can dynamic."""
    auto = torch.export.Dim.AUTO
    return tuple({i: auto for i in range(t.dim())} if isinstance(t, torch.Tensor) else None
                 for t in example_inputs)


def widened(example_inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """``example_inputs`` with batch 2 (each tensor repeated along axis 0) when every tensor
    input but scalars (a loss's ``num_items_in_batch``, kept as they are) has batch 1; None
    when there is nothing to widen."""
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not tensors or any(t.shape[0] != 1 for t in tensors):
        return None
    return tuple(torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.dim() > 0 else t
                 for t in example_inputs)
