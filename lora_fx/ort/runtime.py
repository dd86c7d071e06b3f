"""ONNX Runtime sessions: the best provider present, the providers really used, verification.

onnxruntime-gpu silently falls back to the CPU when CUDA libraries are missing; a session's
``get_providers()`` tells what it really uses, and lorafx says so when CUDA was dropped.

The CUDA provider computes fp32 MatMuls in TF32 by default (10-bit mantissa, unit roundoff
2⁻¹¹): against PyTorch's fp32 that is an error of order 2⁻¹¹ · max |y| per layer, far above
an fp32 tolerance. Verification therefore opens CUDA sessions with ``use_tf32=0``
(:func:`verifying_session`); where a build refuses the option it keeps TF32 and says so, and
the tolerance widens to ``TF32_RTOL · max(1, max |y|)``. Outputs are read through I/O binding
and DLPack (:func:`run_torch`): numpy has no bfloat16, torch has.
"""

from __future__ import annotations

import ctypes
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

# TF32_RTOL is the deploy format's; imported under its own name for verify's runtime.TF32_RTOL
from ..deploy_format import TF32_RTOL as TF32_RTOL
from ..deploy_format import max_diff
from ..errors import LoraFxError, LoraFxWarning

CUDA = "CUDAExecutionProvider"
TF32_OFF = {"use_tf32": "0"}  # CUDA provider option: fp32 MatMuls in fp32
Provider = str | tuple[str, dict[str, Any]]

# ONNX Runtime's own log lines are not the user's business: an unmerged file's adapter inputs
# (initializers that are also graph inputs, by design) would log one warning per tensor on
# load, and a failed run logs its error before the exception lorafx turns into one line
ort.set_default_logger_severity(3)
QUIET = 4  # sessions and runs: errors only as exceptions


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


def require_cuda() -> None:
    """Refuse in one line, saying why, when ONNX Runtime cannot use CUDA on this machine."""
    offered = available_providers()
    if CUDA not in offered:
        raise LoraFxError(f"CUDA requested, but this onnxruntime {ort.__version__} offers only "
                          f"{', '.join(offered)}: install onnxruntime-gpu, or use the CPU")
    if not cuda_driver_present():
        raise LoraFxError("CUDA requested, but no CUDA driver (libcuda) loads on this machine: "
                          "run on a machine with an NVIDIA GPU, or use the CPU")


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
    check_model_path(Path(path))
    opts, disabled = session_options(threads, lean)
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=requested,
                                    disabled_optimizers=disabled)
    except Exception as err:
        text = ort_message(err)
        if "Protobuf parsing failed" in text or "INVALID_PROTOBUF" in str(err):
            raise LoraFxError(f"{path} is not an ONNX model (ONNX Runtime cannot parse it): "
                              "pass a file written by `lorafx export`") from err
        raise LoraFxError(f"ONNX Runtime cannot load {path}: {text}") from err
    used = sess.get_providers()
    names = [p if isinstance(p, str) else p[0] for p in requested]
    dropped = [p for p in names if p not in used and p != "CPUExecutionProvider"]
    if dropped:
        warnings.warn(f"ONNX Runtime fell back to {used[0]}: {', '.join(dropped)} requested but "
                      "not usable (CUDA/cuDNN libraries missing?)", LoraFxWarning, stacklevel=2)
    return sess


def provider_name(provider: Provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


def without_tf32(providers: Sequence[Provider]) -> list[Provider]:
    """``providers`` with ``use_tf32=0`` added to each CUDA entry (other options kept)."""
    out: list[Provider] = []
    for p in providers:
        if provider_name(p) == CUDA:
            options = dict(p[1]) if isinstance(p, tuple) else {}
            out.append((CUDA, {**options, **TF32_OFF}))
        else:
            out.append(p)
    return out


def tf32_requested(providers: Sequence[Provider]) -> bool:
    """True when a CUDA entry of ``providers`` leaves TF32 on (the provider's default)."""
    return any(provider_name(p) == CUDA and str((p[1] if isinstance(p, tuple) else {}).get(
        "use_tf32", "1")) != "0" for p in providers)


def verifying_session(path: str | Path, providers: Sequence[Provider] | None = None,
                      lean: bool = False) -> tuple[Any, bool]:
    """(a session for comparing with PyTorch's fp32, whether TF32 is on in it).

    CUDA entries get ``use_tf32=0``; a build that refuses the option gets the providers as
    asked (TF32 on: the caller widens its tolerance). TF32 counts only where CUDA runs.
    """
    requested: list[Provider] = list(providers) if providers else list(default_providers())
    strict = without_tf32(requested)
    try:
        sess = open_session(path, strict, lean=lean)
    except LoraFxError as err:
        if strict == requested or "tf32" not in str(err).lower():
            raise
        sess = open_session(path, requested, lean=lean)
        strict = requested
    return sess, session_provider(sess) == CUDA and tf32_requested(strict)


def run_torch(sess: Any, inputs: Mapping[str, Any] | Sequence[Any]) -> list[torch.Tensor]:
    """Run ``sess`` through I/O binding, inputs and outputs as CPU torch tensors via DLPack
    (bfloat16 included, which ``InferenceSession.run`` cannot return to numpy)."""
    names = [i.name for i in sess.get_inputs()]
    if isinstance(inputs, Mapping):
        items = list(inputs.items())
    else:
        given = [x for x in inputs if x is not None]
        if len(given) < len(names):
            raise LoraFxError(f"the ONNX model takes {len(names)} inputs ({', '.join(names)}) "
                              f"but {len(given)} were given")
        items = list(zip(names, given, strict=False))
    binding = sess.io_binding()
    held = []
    for name, x in items:
        t = torch.as_tensor(x.detach() if hasattr(x, "detach") else x).cpu().contiguous()
        held.append(t)  # the OrtValue borrows its memory
        binding.bind_ortvalue_input(name, _from_dlpack(t))
    for out in sess.get_outputs():
        binding.bind_output(out.name, "cpu")
    try:
        sess.run_with_iobinding(binding)
    except Exception as err:  # noqa: BLE001 - ONNX Runtime's errors have no common base
        raise LoraFxError(f"ONNX Runtime failed to run the model: "
                          f"{str(err).splitlines()[0]}") from err
    return [torch.from_dlpack(v.to_dlpack()).clone()
            for v in binding._iobinding.get_outputs()]


def host_array(value: Any) -> np.ndarray:
    """An OrtValue's data on the host as numpy; bfloat16 (which numpy lacks) as float32."""
    if value.data_type() != "tensor(bfloat16)":
        return np.asarray(value.numpy())
    c_value = value._ortvalue if hasattr(value, "_ortvalue") else value
    return torch.from_dlpack(c_value.to_dlpack()).float().cpu().numpy()


def _from_dlpack(t: torch.Tensor) -> Any:
    """An OrtValue sharing ``t``'s memory (onnxruntime >= 1.20 reads bool-ness from t)."""
    try:
        return ort.OrtValue.from_dlpack(t)
    except TypeError:  # older onnxruntime: (capsule, is_bool)
        return ort.OrtValue.from_dlpack(t.__dlpack__(), t.dtype == torch.bool)  # type: ignore


def session_options(threads: int | None = None, lean: bool = False
                    ) -> tuple[Any, list[str] | None]:
    """(SessionOptions, optimizers to disable) for :func:`open_session`."""

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if lean:
        opts.add_session_config_entry("session.disable_prepacking", "1")
        opts.enable_cpu_mem_arena = False
    opts.log_severity_level = QUIET
    return opts, (["ConstantFolding"] if lean else None)


def check_model_path(path: Path) -> None:
    """A LoraFxError unless ``path`` is a file (a directory or a missing path, said so)."""
    if path.is_dir():
        inside = sorted(path.glob("*.onnx"))
        hint = f"pass {inside[0]}" if inside else "pass the .onnx file"
        raise LoraFxError(f"{path} is a directory, not an ONNX model: {hint}")
    if not path.exists():
        raise LoraFxError(f"ONNX model {path} does not exist: pass a file written by "
                          "`lorafx export`")


_SHORT = (  # ONNX Runtime's wordings, said in fewer words
    (r"\s*Please fix either the inputs/outputs or the model\.?", ""),
    (r"indices element out of data bounds, idx=(-?\d+) must be within the inclusive range "
     r"\[(-?\d+),(-?\d+)\]", r"index \1 out of range [0, \3]"),
    (r"Got invalid dimensions for input: (\S+) for the following indices index: (\d+) "
     r"Got: (\d+) Expected: (\d+)", r"input \1 has size \3 on axis \2, the model fixes \4"),
)
_HINTS = (  # (words in the short message, what to do)
    ("out of range", "token ids must be < the vocabulary size"),
    ("the model fixes", "give that axis the size the model fixes"),
    ("invalid rank", "give the input as many axes as the model declares"),
    ("data type", "give the input the dtype the model declares"),
)


def ort_message(err: BaseException) -> str:
    """ONNX Runtime's error in one short line: the failing node and its status message."""
    text = " ".join(str(err).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"^Load model from .*? failed:", "", text)
    text = re.sub(r"/onnxruntime_src/\S+:\d+ \S+?\(.*?\)\s*", "", text)  # ORT's source line
    found = re.search(r"running (\w+) node\. Name:'([^']*)' Status Message: (.*)", text)
    if found:
        text = f"{found.group(1)} node {found.group(2)!r}: {found.group(3)}"
    for pattern, short in _SHORT:
        text = re.sub(pattern, short, text)
    return text if len(text) <= 130 else text[:127] + "..."


def run_error(err: BaseException, path: Any) -> LoraFxError:
    """The LoraFxError for a failed run: ONNX Runtime's reason, and what to change."""
    text = ort_message(err)
    hint = next((h for words, h in _HINTS if words in text.lower()), "check the inputs")
    return LoraFxError(f"ONNX Runtime rejected the inputs of {path}: {text}; {hint}")


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
    return run_feeds(sess, feeds(sess, inputs), run_options)


def run_feeds(sess: Any, named: dict[str, Any], run_options: Any = None,
              path: Any = "the model") -> list[np.ndarray]:
    """``sess.run`` on named inputs; ONNX Runtime's failures as one-line LoraFxErrors."""
    options = run_options or ort.RunOptions()
    options.log_severity_level = QUIET
    try:
        return list(sess.run(None, named, options))
    except (ort.capi.onnxruntime_pybind11_state.Fail,
            ort.capi.onnxruntime_pybind11_state.InvalidArgument,
            ort.capi.onnxruntime_pybind11_state.RuntimeException) as err:
        raise run_error(err, path) from err


def max_abs_diff(ort_outputs: Sequence[Any], torch_outputs: Sequence[Any]) -> float:
    """max |ORT − PyTorch| over all outputs (``deploy_format.max_diff``: count and shapes
    must agree)."""
    return max_diff(ort_outputs, torch_outputs)
