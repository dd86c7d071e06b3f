"""Dynamic shapes for torch.export: Dim.AUTO on every axis the caller did not pin.
"""

from __future__ import annotations

from typing import Any

import torch


def auto_dynamic(example_inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """Dim.AUTO on every axis of every tensor input: export keeps what it can dynamic."""
    auto = torch.export.Dim.AUTO
    return tuple({i: auto for i in range(t.dim())} if isinstance(t, torch.Tensor) else None
                 for t in example_inputs)

