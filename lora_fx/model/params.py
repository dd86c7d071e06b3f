"""What an injected GraphModule trains: its branches, their parameters, PEFT's counts.
"""

from __future__ import annotations

import torch
from torch import nn

from ..branches.base import LoraBranch
from ..graph.state import require_state


def branches(gm: nn.Module) -> dict[str, LoraBranch]:
    """The branch module of each injected site."""
    state = require_state(gm)
    out: dict[str, LoraBranch] = {}
    for name, rec in state.sites.items():
        mod = gm.get_submodule(rec.branch)
        assert isinstance(mod, LoraBranch)
        out[name] = mod
    return out


def lora_parameters(gm: nn.Module) -> list[torch.Tensor]:
    """A and B of every site, then the modules_to_save parameters (the trainable set)."""
    state = require_state(gm)
    params: list[torch.Tensor] = [p for b in branches(gm).values() for p in b.parameters()]
    for name in state.saved:
        params.extend(gm.get_submodule(name).parameters())
    return params


def count_parameters(gm: nn.Module) -> tuple[int, int]:
    """(trainable, total) as PEFT's get_nb_trainable_parameters counts them: total includes the
    LoRA parameters and both the original and the copy of each modules_to_save module."""
    state = require_state(gm)
    trainable = sum(p.numel() for p in lora_parameters(gm))
    total = sum(p.numel() for p in gm.parameters())
    # the originals that modules_to_save copies replaced still exist in the base model
    total += sum(p.numel() for n in state.saved for p in gm.get_submodule(n).parameters())
    return trainable, total

