"""ONNX Runtime's transformer graph fusions on an exported file, verified like any export.

``onnxruntime.transformers.optimizer`` rewrites subgraphs into ONNX Runtime's fused kernels
(``com.microsoft`` domain), each the same function of its inputs:

- SkipLayerNormalization:  LN(x + skip [+ bias])  (the residual add folded into LayerNorm);
- BiasGelu / FastGelu:     GELU(x + b), tanh-GELU  0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)));
- Attention / MultiHeadAttention, EmbedLayerNormalization where the exported pattern matches.

The result only runs on ONNX Runtime (contrib ops), so it is an opt-in step after export.
``optimize_onnx`` writes the fused file atomically and, with ``inputs``, checks that ONNX Runtime
gives the same outputs on both files (max |optimized − original| ≤ atol) before keeping it.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .. import fileio
from ..deploy_format import EXTERNAL_DATA_BYTES
from ..errors import LoraFxError
from ..fileio import check_writable_dir
from . import runtime

MODEL_TYPES = ("bert", "gpt2")  # "gpt2" fusions assume the legacy exporter's graph: use "bert"


@dataclass
class OptimizeReport:
    path: Path
    model_type: str
    fused: dict[str, int]                      # fused operator -> count (non-zero only)
    nodes_before: int
    nodes_after: int
    max_abs_diff: float | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def _fuse(src: Path, model_type: str, num_heads: int, hidden_size: int) -> Any:
    """ONNX Runtime's Python fusions only (opt_level 0): the session applies its own later."""
    from onnxruntime.transformers import optimizer

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optimizer.optimize_model(str(src), model_type=model_type,
                                            num_heads=num_heads, hidden_size=hidden_size,
                                            opt_level=0, use_gpu=False)
    except Exception as err:
        raise LoraFxError(f"ONNX Runtime's transformer optimizer failed on {src} "
                          f"(model_type {model_type!r}): {type(err).__name__}: {err}; try "
                          "model_type 'bert', or deploy the file unoptimized") from err


def _save(onnx_model: Any, dst: Path) -> None:
    """Write atomically beside ``dst`` (external data past 2 GB, as export does)."""
    check_writable_dir(dst.parent.resolve())
    size = sum(t.ByteSize() for t in onnx_model.model.graph.initializer)
    fileio.sweep_stale(dst.parent, dst.name)  # leftovers of killed runs
    tmp = fileio.temp_path(dst.parent, dst.name)  # .NAME.PID.RAND.tmp: swept if we die
    tmp.mkdir()
    try:
        external = size > EXTERNAL_DATA_BYTES
        onnx_model.save_model_to_file(str(tmp / dst.name), use_external_data_format=external)
        for item in sorted(tmp.iterdir()):
            if item.name != dst.name:
                os.replace(item, dst.parent / item.name)
        os.replace(tmp / dst.name, dst)
    except OSError as err:
        raise (fileio.io_error(dst, err) or err) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compare_sessions(a: str | Path, b: str | Path, inputs: tuple[Any, ...],
                     providers: list[str] | None = None) -> float:
    """max |outputs of file b − outputs of file a| under ONNX Runtime on ``inputs``."""


    got = runtime.run(runtime.open_session(b, providers), inputs)
    want = runtime.run(runtime.open_session(a, providers), inputs)
    return runtime.max_abs_diff(got, [np.asarray(w) for w in want])


def optimize_onnx(src: str | Path, dst: str | Path, model_type: str = "bert",
                  num_heads: int = 0, hidden_size: int = 0,
                  inputs: tuple[Any, ...] | None = None, atol: float = 1e-4,
                  providers: list[str] | None = None) -> OptimizeReport:
    """Fuse ``src`` with ONNX Runtime's transformer optimizer into ``dst``.

    ``num_heads``/``hidden_size`` 0 let the optimizer read them from the graph. With
    ``inputs``, both files run in ONNX Runtime and ``dst`` is removed (LoraFxError) when their
    outputs differ by more than ``atol``.
    """
    src, dst = Path(src), Path(dst)
    if model_type not in MODEL_TYPES:
        raise LoraFxError(f"unknown model_type {model_type!r}: use one of "
                          f"{', '.join(MODEL_TYPES)}")
    if not src.is_file():
        raise LoraFxError(f"ONNX file {src} does not exist: export the model first")
    if dst.resolve() == src.resolve():
        raise LoraFxError(f"optimized output {dst} is the input file: choose another path "
                          "(the original is needed to verify the result)")
    fused_model = _fuse(src, model_type, num_heads, hidden_size)

    before = len(onnx.load(str(src), load_external_data=False).graph.node)
    stats = {k: int(v) for k, v in fused_model.get_fused_operator_statistics().items() if v}
    _save(fused_model, dst)
    report = OptimizeReport(dst, model_type, stats, before, len(fused_model.model.graph.node))
    if inputs is not None:
        report.max_abs_diff = compare_sessions(src, dst, inputs, providers)
        if not report.max_abs_diff <= atol:
            dst.unlink(missing_ok=True)
            raise LoraFxError(f"ONNX Runtime's fusions changed the outputs of {src} by "
                              f"{report.max_abs_diff:.3g} > {atol:g}; the optimized file was "
                              "removed: deploy the unoptimized export")
    return report
