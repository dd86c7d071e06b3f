"""lorafx: LoRA as a compiler pass (capture → match → inject → merge → ONNX)."""

from .api import (
    branches,
    capture,
    compiled,
    count_parameters,
    export_kv,
    export_kv_mixed,
    export_mixed,
    export_onnx,
    fuse_branches,
    inject,
    load_adapter,
    lora_parameters,
    merge,
    plan,
    save_adapter,
    training_graph,
)
from .config import LoraConfig
from .errors import LoraFxError

__all__ = [
    "LoraConfig",
    "LoraFxError",
    "branches",
    "capture",
    "compiled",
    "count_parameters",
    "export_kv",
    "export_kv_mixed",
    "export_mixed",
    "export_onnx",
    "fuse_branches",
    "inject",
    "load_adapter",
    "lora_parameters",
    "merge",
    "plan",
    "save_adapter",
    "training_graph",
]
