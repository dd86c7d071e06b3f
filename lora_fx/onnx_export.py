"""Emit ONNX with the dynamo exporter, atomically, and check it.

Merged export: W' = W + s·B@A folded first, so the file's op histogram is the base model's.
Models past 2 GB get external data. ``verify`` runs ONNX Runtime on the example inputs and
fails when max |ORT − PyTorch| > atol.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .errors import LoraFxError
from .fileio import check_writable_dir

EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with room for the graph


@dataclass
class ExportReport:
    path: Path
    merged: bool
    seconds: float
    external_data: bool
    op_histogram: dict[str, int]
    max_abs_diff: float | None = None
    provider: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def op_histogram(model: Any) -> Counter[str]:
    """``domain::op_type`` counts over the graph, its subgraphs and local functions."""
    import onnx

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


def flat_outputs(out: Any) -> list[torch.Tensor]:
    """PyTorch outputs flattened as the exporter flattens them (tensors only)."""
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def to_onnx(module: nn.Module, example_inputs: tuple[Any, ...], dynamic_shapes: Any = None,
            opset: int | None = None) -> Any:
    """torch.onnx.export(dynamo=True) → ONNXProgram, with actionable errors."""
    kwargs: dict[str, Any] = {"dynamo": True, "verbose": False, "optimize": True}
    if opset is not None:
        kwargs["opset_version"] = opset
    if dynamic_shapes is not None:
        kwargs["dynamic_shapes"] = dynamic_shapes
    was_training = module.training
    module.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.onnx.export(module, tuple(example_inputs), **kwargs)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LoraFxError(f"ONNX export failed: {type(err).__name__}: {first}; try another "
                          "--opset or report the model") from err
    finally:
        module.train(was_training)


def save_program(program: Any, path: Path, external_data: bool | None = None) -> bool:
    """Save atomically: into a temporary dir beside ``path``, then rename data and model."""
    path = Path(path)
    check_writable_dir(path.parent.resolve())
    proto = program.model_proto
    size = sum(t.ByteSize() for t in proto.graph.initializer)
    use_external = size > EXTERNAL_DATA_BYTES if external_data is None else external_data
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        program.save(str(tmp / path.name), external_data=use_external)
        data = tmp / f"{path.name}.data"
        if data.exists():
            os.replace(data, path.parent / data.name)
        os.replace(tmp / path.name, path)
    except OSError as err:
        raise LoraFxError(f"could not write {path}: {err.strerror or err}: free space or choose "
                          "another path") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return use_external


def export_onnx(gm: nn.Module, example_inputs: tuple[Any, ...], path: str | Path,
                merge: bool = True, opset: int | None = None, verify: bool = True,
                dynamic_shapes: Any = None, atol: float = 1e-4,
                providers: list[str] | None = None) -> ExportReport:
    """Export ``gm`` (an injected GraphModule, or any module) to ONNX at ``path``.

    ``merge=True`` folds every branch first (the file is the base model's graph with new
    weights); ``merge=False`` keeps the branches. ``verify`` compares ONNX Runtime's outputs
    with PyTorch's on ``example_inputs`` and raises LoraFxError above ``atol``.
    """
    from . import api
    from .passes.state import get_state

    start = time.perf_counter()
    module: nn.Module = gm
    if merge and get_state(gm) is not None:
        module = api.merge(gm)
    if dynamic_shapes is None and isinstance(module, fx.GraphModule):
        dynamic_shapes = _auto(example_inputs)
    program = to_onnx(module, example_inputs, dynamic_shapes, opset)
    external = save_program(program, Path(path))
    report = ExportReport(Path(path), merge, 0.0, external, dict(op_histogram(
        program.model_proto)))
    if verify:
        verify_onnx(report, module, example_inputs, atol, providers)
    report.seconds = time.perf_counter() - start
    return report


def _auto(example_inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    auto = torch.export.Dim.AUTO
    return tuple({i: auto for i in range(t.dim())} if isinstance(t, torch.Tensor) else None
                 for t in example_inputs)


def verify_onnx(report: ExportReport, module: nn.Module, example_inputs: tuple[Any, ...],
                atol: float = 1e-4, providers: list[str] | None = None) -> None:
    """Run the file in ONNX Runtime and compare with PyTorch; raise above ``atol``."""
    from . import runtime

    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            want = flat_outputs(module(*example_inputs))
    finally:
        module.train(was_training)
    sess = runtime.open_session(report.path, providers)
    got = runtime.run(sess, example_inputs)
    report.max_abs_diff = runtime.max_abs_diff(got, want)
    report.provider = runtime.session_provider(sess)
    if not report.max_abs_diff <= atol:
        raise LoraFxError(f"verification failed: max |ONNX Runtime - PyTorch| = "
                          f"{report.max_abs_diff:.3g} > {atol:g} on {report.provider}; the file "
                          f"{report.path} was written, do not deploy it")
