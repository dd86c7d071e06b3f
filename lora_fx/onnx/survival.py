"""How much of a merged adapter survived weight quantization (``--merge --dtype int4|int8``).

Merging folds ΔW = s·B@A into W in fp32; quantizing W + ΔW then rounds every weight to a grid
whose step (about max|W_block| / 2^(bits−1)) can be larger than ΔW itself, so the adapter may
vanish into rounding noise without any error (PEFT #638, mlx-lm #1564). On the same inputs, with
every output flattened and concatenated,

    d_q = y_merged_q − y_base_q          (the adapter's effect in the quantized files)
    d   = y_adapter_fp32 − y_base_fp32   (its effect in fp32: the intent)

    ratio  = |d_q| / |d|                       (1: the effect kept its size)
    cosine = ⟨d_q, d⟩ / (|d_q| · |d|)          (1: it kept its direction)
    noise  = |y_base_q − y_base_fp32| / |d|    (the base's own quantization error, in units of d)

The adapter counts as lost when ``cosine < 0.5`` or ``ratio`` is outside [0.5, 2]. For a kept
effect plus independent rounding noise n, d_q = d + n gives cosine = |d| / sqrt(|d|² + |n|²)
and ratio = sqrt(|d|² + |n|²) / |d|: cosine < 0.5 and ratio > 2 both mean |n| > √3·|d|, the
noise outweighing the adapter; ratio < 0.5 means rounding absorbed most of ΔW. Then the file is
mostly the quantized base model, and ``--no-merge`` (A, B kept unquantized beside the quantized
base) keeps the adapter exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_COSINE = 0.5
RATIO_RANGE = (0.5, 2.0)


@dataclass(frozen=True)
class Survival:
    """The adapter's effect after quantization against its fp32 effect (module docstring)."""

    ratio: float      # |d_q| / |d|
    cosine: float     # <d_q, d> / (|d_q| |d|); nan when either is zero
    noise: float      # |y_base_q - y_base_fp32| / |d|
    effect: float     # |d|, the fp32 effect
    lost: bool
    message: str


def _flat(values: Any) -> np.ndarray:
    """Every output (an array, a tensor, or a sequence of them) as one float64 vector."""
    items = values if isinstance(values, (list, tuple)) else [values]
    parts = [np.asarray(v.detach().cpu() if hasattr(v, "detach") else v, dtype=np.float64)
             .ravel() for v in items]
    return np.concatenate(parts) if parts else np.zeros(0)


def adapter_survival(y_base_q: Any, y_merged_q: Any, y_base_fp32: Any, y_adapter_fp32: Any,
                     dtype: str = "int4", min_cosine: float = MIN_COSINE,
                     ratio_range: Sequence[float] = RATIO_RANGE) -> Survival:
    """Compare the adapter's effect in the quantized files with its fp32 effect (module
    docstring). Each argument: the outputs of one model on the same inputs (an array or a
    sequence of arrays / tensors, same shapes across the four). ``dtype`` names the
    quantization in the message."""
    base_q, merged_q = _flat(y_base_q), _flat(y_merged_q)
    base, adapter = _flat(y_base_fp32), _flat(y_adapter_fp32)
    if not base_q.shape == merged_q.shape == base.shape == adapter.shape:
        raise ValueError("adapter_survival: the four outputs differ in size "
                         f"({base_q.size}, {merged_q.size}, {base.size}, {adapter.size})")
    d_q, d = merged_q - base_q, adapter - base
    norm_q, norm = float(np.linalg.norm(d_q)), float(np.linalg.norm(d))
    if norm == 0.0:
        return Survival(math.nan if norm_q else 1.0, math.nan, math.inf, 0.0, False,
                        "the adapter does not change the outputs on these inputs: nothing "
                        f"to lose to {dtype}")
    ratio = norm_q / norm
    cosine = float(d_q @ d) / (norm_q * norm) if norm_q else 0.0
    noise = float(np.linalg.norm(base_q - base)) / norm
    low, high = ratio_range
    lost = cosine < min_cosine or not low <= ratio <= high
    kept = f"ratio {ratio:.2f}, cosine {cosine:.2f}, base {dtype} noise {noise:.2f}x the effect"
    if lost:
        message = (f"the merged adapter did not survive {dtype} quantization ({kept}; lost "
                   f"below cosine {min_cosine} or outside {low}-{high}x): export with "
                   f"--no-merge to keep A and B unquantized beside the {dtype} base")
    else:
        message = f"the merged adapter survived {dtype} quantization ({kept})"
    return Survival(ratio, cosine, noise, norm, lost, message)
