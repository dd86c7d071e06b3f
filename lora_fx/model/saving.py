"""An injected model's adapter out: PEFT's view of its config (``to_adapter``), and save.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

from torch import nn

from ..adapter.peft import MAGNITUDE_KEY, Adapter, write_adapter
from ..branches.base import LoraBranch
from ..branches.linear import LoraFused
from ..config import LoraConfig
from ..graph.state import require_state
from .params import branches


def to_adapter(gm: nn.Module) -> Adapter:
    """The adapter held by an injected GraphModule (A, B per site; modules_to_save tensors).

    Its config is what PEFT reads: ``all-linear`` / ``target_forms`` become the explicit site
    list (expert stacks go to ``target_parameters``, keyed as PEFT nests its wrappers), and a
    fused site is its exact plain equivalent (rank k·r, alpha keeping s); lorafx's
    own config then rides along in ``Adapter.lorafx`` (``lorafx_config.json``). With no
    ``base_model_name_or_path`` in its config, a transformers model's name is recorded, as PEFT
    does.
    """
    state = require_state(gm)
    brs = branches(gm)
    lora = {b.peft_name or name: b.peft_factors() for name, b in brs.items()}  # PEFT's keys
    kinds = {name: b.kind for name, b in brs.items() if b.kind == "embedding"}
    saved = {f"{name}.{pname}": p.detach() for name in state.saved
             for pname, p in gm.get_submodule(name).named_parameters()}
    params = sorted(rec.weight for name, rec in state.sites.items()
                    if brs[name].kind == "experts" or state.config.targets_parameter(rec.weight))
    config, lorafx = _peft_view(state.config, list(state.sites), brs, params)
    if config.base_model_name_or_path is None and base_model_name(gm):  # PEFT records it
        config = dataclasses.replace(config, base_model_name_or_path=base_model_name(gm))
    magnitude = {name: extra[MAGNITUDE_KEY] for name, b in brs.items()
                 if MAGNITUDE_KEY in (extra := b.extra_tensors())}
    return Adapter(config, lora, saved, kinds, lorafx, magnitude=magnitude)


def base_model_name(model: nn.Module) -> str | None:
    """What PEFT records as ``base_model_name_or_path``: a transformers model's
    ``config.name_or_path`` (the directory or hub name it was loaded from; an injected model
    reads its base model's), else None."""
    name = getattr(getattr(model, "config", None), "name_or_path", None)
    return name if isinstance(name, str) and name else None


def _peft_view(config: LoraConfig, sites: list[str], brs: dict[str, LoraBranch],
               params: list[str]) -> tuple[LoraConfig, dict[str, Any] | None]:
    """(config PEFT can load, lorafx's config when PEFT's view loses something, else None);
    ``params``: the weights of the sites PEFT reaches through target_parameters."""
    changes: dict[str, Any] = {}
    if config.target_modules == "all-linear" or config.target_forms:
        modules = sorted(n for n in sites if brs[n].kind != "experts"
                         and not config.targets_parameter(n))
        changes.update(target_modules=modules or None, target_forms=None,
                       target_parameters=sorted(set(config.target_parameters or []) | set(params))
                       or None)
    fused = {n: b for n, b in brs.items() if isinstance(b, LoraFused)}
    if fused:  # keys sort first in the JSON and match one site only: PEFT takes the first match
        keys = {n: f"(?:^{re.escape(n)})" for n in fused}
        ranks = {keys[n]: b.k * b.r for n, b in fused.items()}
        alphas = {keys[n]: b.scaling * (math.sqrt(ranks[keys[n]]) if config.use_rslora
                                        else ranks[keys[n]]) for n, b in fused.items()}
        changes.update(rank_pattern={**ranks, **config.rank_pattern},
                       alpha_pattern={**alphas, **config.alpha_pattern}, enable_lora={})
    view = dataclasses.replace(config, **changes) if changes else config
    return view, (dataclasses.asdict(config) if fused else None)


def save_adapter(gm: nn.Module, directory: str | Path, force: bool = False) -> Path:
    """Write PEFT's adapter layout (adapter_config.json + adapter_model.safetensors)."""
    adapter = to_adapter(gm)
    extra = layout_config(gm)
    return write_adapter(adapter, directory, force=force, extra_config=extra)


def layout_config(gm: nn.Module) -> dict[str, bool]:
    """PEFT's ``fan_in_fan_out``: True when every module site's weight is [in, out] (HF
    Conv1D); expert stacks are oriented by their module instead (PEFT's target_parameters)."""
    brs = branches(gm)
    layouts = {rec.layout for name, rec in require_state(gm).sites.items()
               if brs[name].kind != "experts"}
    return {"fan_in_fan_out": layouts == {"in_out"}}
