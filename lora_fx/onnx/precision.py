"""Precisions: how an export stores its weights.

- "fp32", "fp16", "bf16": PyTorch builds and traces the model in that dtype (every fold done
  in fp32 first, cast once: ``onnx.prepare``).
- "int4", "int8": weight-only quantization of the fp32 file (``onnx.quantize``: base MatMuls
  become MatMulNBits with blocks of ``block`` rows, the tied embedding reads the head's int4
  blocks); activations and LoRA factors stay fp32, adapter inputs stay overridable.

A merged quantized file is also measured for how much of its adapter survived rounding
(``onnx.survival``): its effect y_merged_q − y_base_q against the fp32 effect
y_adapter − y_base, on the verification's example inputs; y_base_q comes from the base model
exported and quantized the same way.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..deploy_format import torch_dtype
from ..errors import LoraFxError, LoraFxWarning
from ..ort import runtime
from .quantize import quantize
from .survival import Survival, adapter_survival
from .verify import Case

QUANT_BITS = {"int4": 4, "int8": 8}
PRECISIONS = ("fp32", "fp16", "bf16", *QUANT_BITS)


@dataclass(frozen=True)
class Quantization:
    """``onnx.quantize``'s options for an int4 / int8 export."""

    bits: int
    block: int = 32
    accuracy_level: int | None = None


def weights_dtype(precision: str) -> str:
    """The float dtype PyTorch builds and traces in for ``precision`` (int4/int8: fp32);
    an unknown precision is refused."""
    if precision in QUANT_BITS:
        return "fp32"
    if precision not in PRECISIONS:
        raise LoraFxError(f"dtype {precision!r} is not supported: use one of "
                          f"{', '.join(PRECISIONS)}")
    torch_dtype(precision)
    return precision


def quantization(precision: str, block: int, accuracy_level: int | None
                 ) -> Quantization | None:
    bits = QUANT_BITS.get(precision)
    return None if bits is None else Quantization(bits, block, accuracy_level)


def quantized(model: Any, quant: Quantization) -> Any:
    """The ``onnx_ir.Model`` ``model`` with its base weights quantized (``onnx.quantize``)."""
    return quantize(model, bits=quant.bits, block=quant.block,
                    accuracy_level=quant.accuracy_level)


def measure_survival(path: Path, base_path: Path, case: Case, precision: str,
                     providers: list[Any] | None) -> Survival | None:
    """The adapter's survival in the quantized merged file ``path`` against the quantized
    base ``base_path`` on ``case`` (its ``want``: fp32 with the adapter, ``base``: without);
    warned about, naming --no-merge, where it is mostly lost."""
    if case.base is None:
        return None
    outputs = []
    for file in (base_path, path):
        sess, _ = runtime.verifying_session(file, providers)
        outputs.append(runtime.run_torch(sess, case.inputs))
    result = adapter_survival(outputs[0], outputs[1], case.base, case.want, precision)
    if result.lost:
        warnings.warn(result.message, LoraFxWarning, stacklevel=3)
    return result


def scratch() -> tempfile.TemporaryDirectory[str]:
    """A temporary folder for the quantized base model the survival report runs."""
    return tempfile.TemporaryDirectory(prefix="lorafx-base-")
