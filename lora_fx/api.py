"""The Python API (README's "Python API"): a facade over the pipeline.

``capture`` → ``plan`` / ``inject`` → (train) → ``save_adapter`` / ``load_adapter`` →
``merge`` → ``export_onnx``. ``lora_fx/__init__.py`` re-exports it and ``lorafx export`` calls
its export functions; no other module of lora_fx imports it. The export functions import
``lora_fx.onnx`` on first use, so ``import lora_fx`` loads no onnx.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .capture.trace import capture
from .model.adapters import apply_adapter, load_adapter, save_adapter, to_adapter
from .model.inject import inject
from .model.merge import merge
from .model.params import branches, count_parameters, lora_parameters
from .model.plan import plan, plan_model
from .train.fast import compiled, fuse_branches, training_graph

if TYPE_CHECKING:  # the reports' types only: lora_fx.onnx is imported on the first export
    from .onnx.report import ExportReport

__all__ = ["apply_adapter", "branches", "capture", "compiled", "count_parameters",
           "export_kv", "export_kv_mixed", "export_mixed", "export_onnx", "fuse_branches", "inject",
           "load_adapter", "lora_parameters", "merge", "plan", "plan_model", "save_adapter",
           "to_adapter", "training_graph"]


def export_onnx(*args: Any, **kwargs: Any) -> ExportReport:
    """``lora_fx.onnx.export.export_onnx`` (see there); onnx is imported on the first export."""
    from .onnx.export import export_onnx as export  # deferred: onnx and onnxscript are heavy

    return export(*args, **kwargs)


def export_kv(*args: Any, **kwargs: Any) -> ExportReport:
    """``lora_fx.onnx.export.export_kv`` (see there): a decoder with its KV cache, in a folder
    ONNX Runtime GenAI loads; onnx is imported on the first export."""
    from .onnx.export import export_kv as export  # deferred: onnx and onnxscript are heavy

    return export(*args, **kwargs)


def export_mixed(*args: Any, **kwargs: Any) -> ExportReport:
    """``lora_fx.onnx.export.export_mixed``: a base model and several adapters as one
    ONNX graph choosing the adapter per batch row (input ``adapter_ids``)."""
    from .onnx.export import export_mixed as export  # deferred: onnx, onnxscript are heavy

    return export(*args, **kwargs)


def export_kv_mixed(*args: Any, **kwargs: Any) -> ExportReport:
    """``lora_fx.onnx.export.export_kv_mixed``: a decoder with its KV cache and an adapter
    per batch row (input ``adapter_ids``), in a folder ``lorafx generate`` decodes."""
    from .onnx.export import export_kv_mixed as export  # deferred: onnx is heavy

    return export(*args, **kwargs)
