"""The export entry points: one ``export()`` of small choices (``onnx.core``), and the four
functions users know, each a choice of target and form.

| function | target | form |
| --- | --- | --- |
| ``export_onnx(gm, inputs, path, merge=...)`` | Plain | Merged / Unmerged |
| ``export_kv(model, path, adapter, merge=...)`` | Decoder | Merged / Unmerged |
| ``export_mixed(model, inputs, adapters, path)`` | Plain | Mixed |
| ``export_kv_mixed(model, path, adapters)`` | Decoder | Mixed |

Every one takes ``dtype`` ("fp32", "fp16", "bf16", "int4", "int8"; None is fp32; int4 / int8
with ``quant_block`` and ``accuracy_level``), ``verify``, ``atol`` (the
absolute part of the limit, ``onnx.limits``), ``providers`` and ``opset``, and returns one
``ExportReport``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from torch import nn

from ..adapter.peft import Adapter
from .core import Job
from .core import export as run
from .forms import AdapterSet, Form, Merged, Mixed, Unmerged
from .report import ExportReport
from .targets import Decoder, Plain, Target


def export(model: nn.Module, path: str | Path, *, target: Literal["plain", "kv"] = "plain",
           form: Literal["merged", "unmerged", "mixed"] = "merged",
           precision: str = "fp32", example_inputs: tuple[Any, ...] = (),
           adapter: str | Path | Adapter | None = None, adapters: AdapterSet = (),
           dynamic_shapes: Any = None, eager: nn.Module | None = None,
           source: str | Path | None = None, adapter_name: str = "adapter",
           opset: int | None = None, verify: bool = True, atol: float | None = None,
           providers: list[Any] | None = None, release: bool = False,
           quant_block: int = 32, accuracy_level: int | None = None,
           fuse: bool = False) -> ExportReport:
    """Export ``model`` to ``path`` as ``target`` ("plain": ``model`` on ``example_inputs``,
    an injected GraphModule for merged / unmerged; "kv": a Hugging Face decoder with its KV
    cache, ``adapter`` applied) in ``form`` ("mixed": the base ``model`` and ``adapters``),
    weights in ``precision``. ``eager``: the eager model a torch.export capture came from;
    ``source``: the decoder's save_pretrained directory (tokenizer files); ``release``:
    free the model's weights before verifying (big models; the model cannot run after).
    ``precision`` "int4" / "int8": base MatMuls quantized in blocks of ``quant_block`` rows
    (``accuracy_level`` as ONNX Runtime's MatMulNBits names it); merged, the report's
    ``survival`` says how much of the adapter the rounding left. ``fuse`` (target "kv"):
    ONNX Runtime's fused ops where onnxscript's rules match (``onnx.fuse``; report extra
    ``fused``)."""
    chosen: Target = Plain(model, example_inputs, dynamic_shapes, eager) if target == "plain" \
        else Decoder(model, source, adapter_name)
    shape: Form = Mixed(adapters) if form == "mixed" else \
        Merged(adapter) if form == "merged" else Unmerged(adapter)
    return run(Job(Path(path), chosen, shape, precision or "fp32", opset, verify, atol,
                   providers, release, quant_block, accuracy_level, fuse))


def export_onnx(gm: nn.Module, example_inputs: tuple[Any, ...], path: str | Path,
                merge: bool = True, opset: int | None = None, verify: bool = True,
                dynamic_shapes: Any = None, atol: float | None = None,
                providers: list[Any] | None = None, dtype: str | None = None,
                model: nn.Module | None = None, release: bool = False,
                quant_block: int = 32, accuracy_level: int | None = None) -> ExportReport:
    """Export ``gm`` (an injected GraphModule, or any module) to ONNX at ``path``.

    ``merge=True`` folds every branch first (the file is the base model's graph with new
    weights); ``merge=False`` keeps each branch as MatMul(x, A')→MatMul(·, B')→Add with A', B'
    as ONNX Runtime adapter inputs (``onnx.unmerged``). ``verify`` compares ONNX Runtime's
    outputs with PyTorch's on ``example_inputs`` and another shape within ``onnx.limits``.
    ``dtype`` "fp16"/"bf16": merge in fp32, cast every weight once (a torch.export capture
    also needs the eager ``model``); ``extras["error_vs_fp32"]`` holds max |y − y_fp32|.
    ``release=True`` (models too big for two copies) consumes the model: an fp32 merge folds
    W' into each weight's own storage, and after the export every weight of ``gm`` (and of the
    user's model, which shares them) is freed before ONNX Runtime verifies.
    """
    report = export(gm, path, form="merged" if merge else "unmerged",
                    precision=dtype or "fp32", example_inputs=example_inputs,
                    dynamic_shapes=dynamic_shapes, eager=model, opset=opset, verify=verify,
                    atol=atol, providers=providers, release=release, quant_block=quant_block,
                    accuracy_level=accuracy_level)
    report.merged = merge
    return report


def export_kv(model: nn.Module, path: str | Path, adapter: str | Path | Adapter | None = None,
              merge: bool = True, opset: int | None = None, verify: bool = True,
              atol: float | None = None, providers: list[Any] | None = None,
              source: str | Path | None = None, adapter_name: str = "adapter",
              dtype: str = "fp32", quant_block: int = 32,
              accuracy_level: int | None = None, fuse: bool = False) -> ExportReport:
    """Export the Hugging Face decoder ``model`` (with ``adapter``: a directory or an
    ``Adapter``, merged or not) with its KV cache to ``path`` (DIR/model.onnx) and ORT GenAI's
    files beside it; unmerged, the adapter's ONNX Runtime file too (``adapter_name``), the
    model's own A', B' zero (the base model until an adapter is made active). ``dtype``:
    "fp32" or "fp16" (the weights, the cache and the adapter file). ``fuse``: ONNX Runtime's
    fused ops where onnxscript's rules match (``onnx.fuse``)."""
    return export(model, path, target="kv", form="merged" if merge else "unmerged",
                  precision=dtype, adapter=adapter, source=source, adapter_name=adapter_name,
                  opset=opset, verify=verify, atol=atol, providers=providers,
                  quant_block=quant_block, accuracy_level=accuracy_level, fuse=fuse)


def export_mixed(model: nn.Module, example_inputs: tuple[Any, ...],
                 adapters: Mapping[str, str | Path | Adapter] | Sequence[str | Path],
                 path: str | Path, opset: int | None = None, verify: bool = True,
                 dynamic_shapes: Any = None, atol: float | None = None,
                 providers: list[Any] | None = None, dtype: str | None = None,
                 quant_block: int = 32, accuracy_level: int | None = None) -> ExportReport:
    """Export base ``model`` with ``adapters`` (id k = k-th; directories named by their
    folder names, or a mapping name → directory / ``Adapter``) as one mixed-batch ONNX file
    (``onnx.mixed_program``): input ``adapter_ids`` picks each row's adapter, 0 the base.
    Every tensor input's axis 0 is the batch. ``extras``: ``adapters`` (names by id),
    ``ids_file``, ``lora_inputs`` {site: in, out, r}."""
    return export(model, path, form="mixed", precision=dtype or "fp32",
                  example_inputs=example_inputs, adapters=adapters,
                  dynamic_shapes=dynamic_shapes, opset=opset, verify=verify, atol=atol,
                  providers=providers, quant_block=quant_block, accuracy_level=accuracy_level)


def export_kv_mixed(model: nn.Module, path: str | Path,
                    adapters: Mapping[str, str | Path | Adapter] | Sequence[str | Path],
                    opset: int | None = None, verify: bool = True, atol: float | None = None,
                    providers: list[Any] | None = None,
                    source: str | Path | None = None, dtype: str = "fp32",
                    quant_block: int = 32, accuracy_level: int | None = None,
                    fuse: bool = False) -> ExportReport:
    """Export the Hugging Face decoder ``model`` with its KV cache and ``adapters`` (id k =
    k-th; 0 = the base model) chosen per row by ``adapter_ids``, to ``path`` (DIR/model.onnx)
    with GenAI's config, the tokenizer files of ``source`` and ``model.adapter_ids.json``.
    ORT GenAI cannot feed ``adapter_ids``: ``lorafx generate`` decodes it with onnxruntime."""
    return export(model, path, target="kv", form="mixed", precision=dtype, adapters=adapters,
                  source=source, opset=opset, verify=verify, atol=atol, providers=providers,
                  quant_block=quant_block, accuracy_level=accuracy_level, fuse=fuse)
