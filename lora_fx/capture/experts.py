"""Capture of mixture-of-experts models: an exportable experts implementation while capturing.

Hugging Face's MoE blocks (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, GPT-OSS, ... in
transformers 5) keep each expert stack as one 3-D parameter (``gate_up_proj`` [E, 2I, H],
``down_proj`` [E, H, I]) and pick their forward by ``config._experts_implementation``:

- ``"eager"`` loops over the experts that were hit (``nonzero``): data-dependent, torch.export
  stops on it;
- ``"grouped_mm"`` (the default wherever it can dispatch, the CPU included) sorts the routed
  (token, expert) rows by expert and multiplies each expert's rows by its weight once
  (``torch._grouped_mm``, or transformers' custom op ``transformers::grouped_mm_fallback``
  while traced): exportable, and the cheapest to train (each weight read once per step);
  lorafx translates the op to ONNX (``onnx.experts``: without it, "Failed to convert the
  exported program");
- ``"batched_mm"`` gathers ``W[expert_ids]`` per routed row and calls ``bmm``: exportable, but
  it materializes [rows, out, in] weights (fine for decoding, not for training).

All compute y = Σ_k g_k · expert_{e_k}(x) for the same routing, so capture keeps an exportable
implementation the user chose and runs ``"grouped_mm"`` instead of any other, on every config
an experts module reads, giving each config its own value back afterwards (as ``capture.cache``
does with ``use_cache``). The captured graph holds the expert sites the matcher finds
(``match.experts``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

EXPORTABLE = ("grouped_mm", "batched_mm")  # captured as they are; others run the first
_INTERNAL = "_experts_implementation_internal"  # the field behind transformers' property


def is_experts_module(module: nn.Module) -> bool:
    """Whether ``module`` dispatches its forward on ``config._experts_implementation``
    (transformers' ``use_experts_implementation`` decorator sets these attributes)."""
    config = getattr(module, "config", None)
    return (config is not None and hasattr(config, "_experts_implementation")
            and hasattr(module, "has_gate") and hasattr(module, "is_transposed"))


def experts_configs(model: nn.Module) -> list[Any]:
    """The distinct configs that ``model``'s experts modules read, each once."""
    found: dict[int, Any] = {}
    for module in model.modules():
        if is_experts_module(module):
            found.setdefault(id(module.config), module.config)
    return list(found.values())


def _set(config: Any, value: Any) -> None:
    """Set one config's implementation only (the public setter also rewrites sub-configs)."""
    if hasattr(config, _INTERNAL):
        setattr(config, _INTERNAL, value)
    else:
        config._experts_implementation = value


@contextlib.contextmanager
def exportable_experts(model: nn.Module) -> Iterator[None]:
    """``_experts_implementation = "grouped_mm"`` on every experts config of ``model`` whose
    implementation torch.export cannot capture, inside the block; each config's own value
    restored after (also on error)."""
    configs = [c for c in experts_configs(model) if c._experts_implementation not in EXPORTABLE]
    before = [c._experts_implementation for c in configs]
    for c in configs:
        _set(c, EXPORTABLE[0])
    try:
        yield
    finally:
        for c, value in zip(configs, before, strict=True):
            _set(c, value)
