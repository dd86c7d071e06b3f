"""What an export produced: its report, the file's op histogram and initializer bytes (counted
without copying a weight)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx_ir.traversal import RecursiveGraphIterator

from .kv_cache import DecoderLayout
from .limits import Check
from .survival import Survival


@dataclass
class ExportReport:
    """What one export wrote and how it verified, for every target x form x precision.

    ``max_abs_diff`` is the worst case's max |ONNX Runtime − PyTorch|; ``checks`` has each
    case with its limit. A KV-cache export also has ``layout`` (the decoder's shape),
    ``copied`` (tokenizer files) and, unmerged, ``adapter_file`` (beside the model).
    ``extras``: the JSON view's further entries (``verification``, ``verified_shapes``,
    ``fixed_axes``, ``error_vs_fp32``, ``adapters`` and ``ids_file`` of a mixed batch, ...).
    """

    path: Path
    merged: bool
    seconds: float
    external_data: bool
    op_histogram: dict[str, int]
    max_abs_diff: float | None = None
    provider: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)   # one per verified case
    dtype: str = "fp32"
    lora_inputs: dict[str, dict[str, int]] = field(default_factory=dict)  # site → in, out, r
    layout: DecoderLayout | None = None
    adapter_file: Path | None = None
    copied: list[str] = field(default_factory=list)
    survival: Survival | None = None      # merged int4 / int8: how much of the adapter is left

    @property
    def limits(self) -> dict[str, float]:
        """case → its limit (``onnx.limits``)."""
        return {c.name: c.limit for c in self.checks}

    @property
    def errors(self) -> dict[str, float]:
        """case → max |ONNX Runtime − PyTorch|."""
        return {c.name: c.max_abs_diff for c in self.checks}


KvReport = ExportReport  # the name a KV-cache export's report had


def op_histogram(model: Any) -> Counter[str]:
    """``domain::op_type`` counts over the graph, its subgraphs and local functions.

    ``model``: an ``onnx.ModelProto``, or an ``onnx_ir.Model`` (an ONNXProgram's ``.model``),
    which is walked as is: ``program.model_proto`` would serialize every weight (a full copy).
    """

    if not isinstance(model, onnx.ModelProto):
        return _ir_histogram(model)
    counts: Counter[str] = Counter()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[f"{node.domain or 'ai.onnx'}::{node.op_type}"] += 1
            for attr in node.attribute:
                if attr.g is not None and attr.HasField("g"):
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    for fn in model.functions:
        for node in fn.node:
            counts[f"{node.domain or 'ai.onnx'}::{node.op_type}"] += 1
    return counts


def _ir_histogram(model: Any) -> Counter[str]:
    """``op_histogram`` of an ``onnx_ir.Model``: the same counts, no tensor touched."""

    counts: Counter[str] = Counter(f"{n.domain or 'ai.onnx'}::{n.op_type}"
                                   for n in RecursiveGraphIterator(model.graph))
    for fn in model.functions.values():
        counts.update(f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in fn)
    return counts


def initializer_bytes(model: Any) -> int:
    """Bytes of an ``onnx_ir.Model``'s initializers (what external data would hold)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None)

