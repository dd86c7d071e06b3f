"""Facts of lorafx's ONNX files, one copy each: adapter input names and values, dtypes, limits.

An unmerged site's adapter inputs are A' = Aᵀ (in, r) and B' = s·Bᵀ (r, out) (the scale folded
into B), named ``<site>.lora_A.weight`` / ``<site>.lora_B.weight``: ONNX Runtime's overridable
initializers, so that ``Δ(x) = (x A') B' = s·x Aᵀ Bᵀ``.
"""

from __future__ import annotations

import torch

from ..errors import LoraFxError

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
RANK_META = "lorafx.lora_sites"  # model metadata_props key: JSON {site: [in, out, r]}
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with room for the graph
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ONNX_TYPES = {1: "fp32", 10: "fp16", 16: "bf16"}  # TensorProto elem_type → dtype name
# verification of a cast export: max |ORT − fp32 PyTorch| <= rtol · max(1, max |y|)
DTYPE_RTOL = {"fp32": 0.0, "fp16": 1e-2, "bf16": 6e-2}


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of ``dtype`` ("fp32", "fp16", "bf16"); anything else is refused."""
    if dtype not in DTYPES:
        raise LoraFxError(f"dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def onnx_factors(a: torch.Tensor, b: torch.Tensor, scale: float,
                 dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's A (r, in), B (out, r) → (A' = Aᵀ, B' = s·Bᵀ), computed in fp32 and cast once to
    ``dtype`` (default: A's)."""
    a_t = a.float().flatten(1).t().contiguous()
    b_t = (float(scale) * b.float().flatten(1)).t().contiguous()
    target = dtype or a.dtype
    return a_t.to(target), b_t.to(target)
