"""State dicts of a LoraModel with each tied tensor once, as ``save_pretrained`` writes them.

A captured graph reads a tied weight (GPT-2's ``wte`` and ``lm_head``) under both names, so its
plain state dict holds one tensor twice, which safetensors refuses to write (and so does
``transformers.Trainer``'s checkpoint of any model that is not a ``PreTrainedModel``). The
state dict keeps the first name of each tensor; loading fills the other names from it.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from torch import nn


def _identity(t: torch.Tensor) -> tuple[Any, ...] | None:
    """What makes two tensors the same memory (None for tensors without storage)."""
    if t.is_meta or t.device.type == "meta":
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
            t.stride(), t.dtype)


def unalias(state: MutableMapping[str, Any], prefix: str = "") -> MutableMapping[str, Any]:
    """Drop every key under ``prefix`` whose tensor an earlier key already holds."""
    seen: set[tuple[Any, ...]] = set()
    for key in list(state):
        value = state[key]
        if not key.startswith(prefix) or not isinstance(value, torch.Tensor):
            continue
        ident = _identity(value)
        if ident is None:
            continue
        if ident in seen:
            del state[key]
        seen.add(ident)
    return state


def tied_names(module: nn.Module) -> list[list[str]]:
    """The names of each tensor that ``module`` holds under more than one name."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    named = [*module.named_parameters(remove_duplicate=False),
             *module.named_buffers(remove_duplicate=False)]
    for name, t in named:
        ident = _identity(t)
        if ident is not None:
            groups.setdefault(ident, []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def realias(module: nn.Module, state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with the names ``unalias`` dropped filled in from the name it kept."""
    full = dict(state)
    for names in tied_names(module):
        kept = next((n for n in names if n in full), None)
        if kept is not None:
            full.update({n: full[kept] for n in names if n not in full})
    return full
