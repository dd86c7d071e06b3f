"""What ``-t`` / ``--target-regex`` / ``--target-parameters`` ask for, as a LoraConfig."""

from __future__ import annotations

from typing import Any

import click

from ..config import LoraConfig
from .common import target_config
from .lists import ListOption

target_parameters_option = click.option(
    "--target-parameters", "target_parameters", cls=ListOption,
    help="Parameter paths or .-suffixes, as PEFT's target_parameters (3-D expert stacks such "
         "as mlp.experts.gate_up_proj): LoRA on the parameter itself, per expert.")


def lora_config(targets: tuple[str, ...], target_regex: str | None,
                target_parameters: tuple[str, ...], rank: int, alpha: float | None,
                **fields: Any) -> LoraConfig:
    """``target_config`` plus PEFT's ``target_parameters``; those alone are a target too."""
    params = list(target_parameters) or None
    if params and not targets and not target_regex:
        return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                          target_parameters=params, **fields)
    return target_config(targets, target_regex, rank, alpha, target_parameters=params, **fields)
