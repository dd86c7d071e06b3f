"""ONNX Runtime sessions: the best provider present, the providers really used, verification.

onnxruntime-gpu silently falls back to the CPU when CUDA libraries are missing; a session's
``get_providers()`` tells what it really uses, and lorafx says so when CUDA was dropped.
"""

from __future__ import annotations

import ctypes
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..errors import LoraFxError, LoraFxWarning


def available_providers() -> list[str]:

    return list(ort.get_available_providers())


def cuda_driver_present() -> bool:
    """True when the CUDA driver library loads (a GPU driver is installed)."""
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True


def default_providers() -> list[str]:
    """CUDA first where ONNX Runtime offers it and a CUDA driver is present, then the CPU."""
    offered = available_providers()
    cuda = "CUDAExecutionProvider" in offered and cuda_driver_present()
    return (["CUDAExecutionProvider"] if cuda else []) + ["CPUExecutionProvider"]


def open_session(path: str | Path,
                 providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
                 threads: int | None = None, lean: bool = False) -> Any:
    """An ``onnxruntime.InferenceSession`` on ``providers`` (default: CUDA if present, else CPU;
    a provider may be a ``(name, options)`` pair, as ONNX Runtime accepts).

    ``lean``: for one run of a big model (verification), hold its weights about once: no
    weight prepacking (a packed copy of every MatMul weight), no memory arena, and no constant
    folding. Folding would store a transposed copy of a weight the graph transposes (a tied LM
    head: its [d, vocab] transpose); unfolded, ONNX Runtime's MatMul-Transpose fusion reads
    the weight itself (``FusedMatMul`` with transB=1). The other fusions stay on.
    Warns when a requested accelerator provider is not among the providers the session uses.
    """

    requested = list(providers) if providers else default_providers()
    opts, disabled = session_options(threads, lean)
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=requested,
                                    disabled_optimizers=disabled)
    except Exception as err:
        raise LoraFxError(f"ONNX Runtime cannot load {path}: {str(err).splitlines()[0]}") from err
    used = sess.get_providers()
    names = [p if isinstance(p, str) else p[0] for p in requested]
    dropped = [p for p in names if p not in used and p != "CPUExecutionProvider"]
    if dropped:
        warnings.warn(f"ONNX Runtime fell back to {used[0]}: {', '.join(dropped)} requested but "
                      "not usable (CUDA/cuDNN libraries missing?)", LoraFxWarning, stacklevel=2)
    return sess


def session_options(threads: int | None = None, lean: bool = False
                    ) -> tuple[Any, list[str] | None]:
    """(SessionOptions, optimizers to disable) for :func:`open_session`."""

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if lean:
        opts.add_session_config_entry("session.disable_prepacking", "1")
        opts.enable_cpu_mem_arena = False
    opts.log_severity_level = 3
    return opts, (["ConstantFolding"] if lean else None)


def session_provider(sess: Any) -> str:
    """The provider that runs the session's nodes first (what it really uses)."""
    return str(sess.get_providers()[0])


def feeds(sess: Any, inputs: Sequence[Any]) -> dict[str, np.ndarray]:
    """Map positional tensors onto the session's graph inputs, in order."""
    names = [i.name for i in sess.get_inputs()]
    arrays = [_numpy(x) for x in inputs if x is not None]
    if len(arrays) < len(names):
        raise LoraFxError(f"the ONNX model takes {len(names)} inputs ({', '.join(names)}) but "
                          f"{len(arrays)} were given")
    return dict(zip(names, arrays, strict=False))


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return np.ascontiguousarray(x.detach().cpu().numpy())
    return np.asarray(x)


def run(sess: Any, inputs: Sequence[Any], run_options: Any = None) -> list[np.ndarray]:
    return list(sess.run(None, feeds(sess, inputs), run_options))


def max_abs_diff(ort_outputs: Sequence[np.ndarray], torch_outputs: Sequence[Any]) -> float:
    """max |ORT − PyTorch| over all outputs (shapes must agree)."""
    if len(ort_outputs) != len(torch_outputs):
        raise LoraFxError(f"ONNX Runtime returned {len(ort_outputs)} outputs, PyTorch "
                          f"{len(torch_outputs)}")
    worst = 0.0
    for got, want in zip(ort_outputs, torch_outputs, strict=True):
        want_np = _numpy(want).astype(np.float64)
        if got.shape != want_np.shape:
            raise LoraFxError(f"output shape {got.shape} from ONNX Runtime differs from PyTorch's "
                              f"{want_np.shape}")
        if got.size:
            worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - want_np))))
    return worst
