"""lorafx: LoRA as a compiler pass (capture → match → inject → merge → ONNX)."""

from .api import (
    branches,
    count_parameters,
    inject,
    load_adapter,
    lora_parameters,
    merge,
    plan,
    save_adapter,
)
from .capture import capture
from .config import LoraConfig
from .errors import LoraFxError

__all__ = [
    "LoraConfig",
    "LoraFxError",
    "branches",
    "capture",
    "count_parameters",
    "export_onnx",
    "inject",
    "load_adapter",
    "lora_parameters",
    "merge",
    "plan",
    "save_adapter",
]


def __getattr__(name: str) -> object:
    if name == "export_onnx":  # onnx is imported only when exporting
        from .onnx_export import export_onnx

        return export_onnx
    raise AttributeError(name)
