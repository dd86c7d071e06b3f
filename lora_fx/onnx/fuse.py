"""Fused decoder graphs: onnxscript's ONNX Runtime fusions (``rewriter.ort_fusions``) on an
exported KV decoder, in place, before it is saved (and verified like any export).

``fuse_xformers`` is the rule sequence of onnxscript's ``optimize_for_ort`` without its last
passes: ``optimize_for_ort`` also runs ``RemoveInitializersFromInputsPass``, which would turn an
unmerged file's A', B' (graph inputs with initializers: overridable, the adapter file swaps
them) into constants. The rules leave those inputs and their MatMul branches as they are.

What applies to lorafx's LLaMA-style KV decoders (onnxscript 0.7): RMSNorm becomes
SimplifiedLayerNormalization and the residual add before it SkipSimplifiedLayerNormalization
(contrib ops). The rotary rule matches, but ``cos_sin_cache`` does not (the exported
cos / sin take ``position_ids * inv_freq`` as a broadcast Mul, not the MatMul + Transpose it
expects), so the final inlining restores the plain rotary ops; SDPA / GroupQueryAttention /
MultiHeadAttention do not match HF's masked attention as exported. ``past_present_share_buffer``
therefore stays false.

The export core fuses fp32-built files only (fp32, and int4 / int8 before quantization): a
fused fp16 GPT-2 file decoded other greedy tokens than PEFT's fp32 model in
tests/onnx/test_kv_cache.py, the unfused one does not. Opt-in (``export_kv(fuse=True)`` /
``lorafx export --kv-cache --fuse``): decode takes ~0.9x the time, but the rewrite adds minutes
to a 30-layer export (benchmarks/README.md).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# the contrib ops the fusions produce, counted in the result
FUSED_OPS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
             "SkipLayerNormalization", "RotaryEmbedding", "MultiHeadAttention",
             "GroupQueryAttention", "Attention", "FastGelu", "BiasGelu", "Gelu")


def _histogram(model: Any) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.all_nodes())


@contextmanager
def _quiet() -> Iterator[None]:
    """onnx_ir's passes log one line per initializer they cannot deduplicate (every A', B')."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def fuse(model: Any) -> dict[str, int]:
    """Apply onnxscript's ONNX Runtime fusions to the ``onnx_ir.Model`` ``model`` in place;
    return the count of each fused op the rewrite added (nonzero only). Without onnxscript's
    ``ort_fusions`` (another layout) the model is left as it is and ``{}`` returned."""
    try:
        from onnxscript.rewriter.ort_fusions._core import fuse_xformers
    except ImportError:  # pragma: no cover - another onnxscript layout
        return {}
    before = _histogram(model)
    with _quiet():
        result, _ = fuse_xformers(model)
    if result is not model:  # pragma: no cover - fuse_xformers rewrites in place today
        raise RuntimeError("onnxscript's fuse_xformers returned a new model")
    after = _histogram(model)
    return {op: after[op] - before[op] for op in FUSED_OPS if after[op] > before[op]}
