"""What the passes record on a GraphModule: the LoRA state and the keys of tagged nodes."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx, nn

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


def delta_nodes(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    """Site name → its ``delta = lora.<site>(...)`` nodes, in graph order."""
    out: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        tag = node.meta.get(NODE_KEY) or {}
        if tag.get("role") == "delta":
            out.setdefault(tag["site"], []).append(node)
    return out
