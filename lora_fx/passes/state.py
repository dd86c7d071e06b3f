"""What the passes record on a GraphModule, and copy-on-write edits of its module tree."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..config import LoraConfig
from ..errors import LoraFxError

STATE_KEY = "lorafx"   # gm.meta[STATE_KEY]: LoraState
NODE_KEY = "lora"      # node.meta[NODE_KEY]: {"site": name, "role": "delta" | "add"}
BRANCH_ROOT = "lora"   # branch of site S lives at gm.lora.<S>


@dataclass
class SiteRecord:
    """An injected site: where its weight is and how it is laid out."""

    name: str
    weight: str           # parameter path in the GraphModule
    form: str
    layout: str           # "out_in" ([out, in], like nn.Linear) or "in_out" (Conv1D, x @ W)
    in_features: int
    out_features: int
    branch: str           # submodule path of the branch

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class LoraState:
    config: LoraConfig
    sites: dict[str, SiteRecord] = field(default_factory=dict)
    saved: list[str] = field(default_factory=list)   # modules_to_save paths


def get_state(gm: nn.Module) -> LoraState | None:
    meta = getattr(gm, "meta", None)
    state = meta.get(STATE_KEY) if isinstance(meta, dict) else None
    return state if isinstance(state, LoraState) else None


def require_state(gm: nn.Module) -> LoraState:
    state = get_state(gm)
    if state is None:
        raise LoraFxError("this module has no LoRA branches: call lora_fx.inject() first")
    return state


def _cow_child(parent: nn.Module, name: str) -> nn.Module:
    """Replace ``parent.name`` by a shallow copy with its own child/param/buffer dicts."""
    child = parent.get_submodule(name)
    twin = copy.copy(child)
    twin._modules = dict(child._modules)
    twin._parameters = dict(child._parameters)
    twin._buffers = dict(child._buffers)
    parent._modules[name] = twin
    return twin


def set_attr_cow(root: nn.Module, path: str, value: Any) -> None:
    """``root.<path> = value`` without touching modules that ``root`` shares with others.

    Every module along ``path`` is replaced by a shallow copy first, so a module of the user's
    model that the GraphModule shares is never mutated.
    """
    *parents, last = path.split(".")
    mod = root
    for name in parents:
        mod = _cow_child(mod, name)
    if isinstance(value, nn.Module):
        mod._modules[last] = value
    elif last in mod._parameters or isinstance(value, nn.Parameter):
        mod._parameters[last] = value
    elif last in mod._buffers:
        mod._buffers[last] = value
    else:
        setattr(mod, last, value)


def add_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register ``module`` at ``path``, creating empty parents as needed."""
    *parents, last = path.split(".")
    mod = root
    for name in parents:
        if name not in mod._modules:
            mod.add_module(name, nn.Module())
        mod = mod.get_submodule(name)
    mod.add_module(last, module)
