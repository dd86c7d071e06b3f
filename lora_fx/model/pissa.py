"""PiSSA / OLoRA adapters and plain LoRA: PEFT's conversion, and loading onto W_res.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..adapter.peft import Adapter, Factors, read_adapter, write_adapter
from ..config import LoraConfig
from ..errors import LoraFxError
from ..graph.state import require_state
from ..variants.init import INIT_KEY, reads_weight
from .adapters import apply_adapter, layout_config, to_adapter


def _doubled_config(config: LoraConfig) -> LoraConfig:
    """PEFT's config for the converted adapter: r, rank_pattern and alpha doubled (alpha·√2
    with rsLoRA, so that alpha/√r is unchanged), init_lora_weights = True."""
    alpha = config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2)
    return dataclasses.replace(
        config, init_lora_weights=True, r=2 * config.r, lora_alpha=alpha,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()})


def to_plain_lora(gm: nn.Module) -> Adapter:
    """PEFT's PiSSA/OLoRA → LoRA conversion of an injected (trained) ``gm``.

    Per site A' = [A ; A₀] (2r, in) and B' = (s / s')·[B | −B₀] (out, 2r), so that
    s'·B'A' = s·B A − s·B₀A₀: applied to the original W it gives W_res + s·B A, the trained
    model. s / s' = 1 except with rsLoRA plus patterns, which PEFT refuses and lorafx keeps
    exact by this factor.
    """

    state = require_state(gm)
    factors = getattr(gm, "meta", {}).get(INIT_KEY)
    if not reads_weight(state.config.init_lora_weights) or factors is None:
        raise LoraFxError("this model has no PiSSA/OLoRA init to convert: inject or load it with "
                          "init_lora_weights='pissa' or 'olora' first")
    adapter = to_adapter(gm)
    if getattr(adapter, "magnitude", None):
        raise LoraFxError("a DoRA adapter with a PiSSA/OLoRA init cannot be converted to plain "
                          "LoRA: merge it into the model instead")
    config = _doubled_config(adapter.config)
    lora: dict[str, Factors] = {}
    for name, (a, b) in adapter.lora.items():
        a0, b0 = factors[name]
        ratio = adapter.config.scale_for(name) / config.scale_for(name)
        lora[name] = (torch.cat([a, a0.to(a.dtype)], dim=0),
                      torch.cat([b, -b0.to(b.dtype)], dim=1) * ratio)
    return Adapter(config, lora, dict(adapter.saved))


def save_plain_lora(gm: nn.Module, directory: str | Path, force: bool = False) -> Path:
    """Write :func:`to_plain_lora` of ``gm`` in PEFT's layout (for the original base model)."""

    return write_adapter(to_plain_lora(gm), directory, force=force,
                         extra_config=layout_config(gm))


def load_on_residual(model: nn.Module, example_inputs: tuple[Any, ...],
                     directory: str | Path, dynamic_shapes: Any = None) -> fx.GraphModule:
    """Load a raw PiSSA/OLoRA adapter onto a base model that already holds W_res (e.g. PEFT's
    ``unload()``-ed residual model): its A, B apply as they are, nothing is subtracted again."""

    adapter = read_adapter(directory)
    adapter.config = dataclasses.replace(adapter.config, init_lora_weights=True)
    return apply_adapter(model, example_inputs, adapter, dynamic_shapes, where=str(directory))

