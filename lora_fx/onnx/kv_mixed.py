"""A decoder with its KV cache and an adapter per batch row: ``--kv-cache --mixed-batch``.

The KV decoder of ``onnx.kv_cache`` (GenAI's input and output names) with a mixed-batch branch
at every site the adapters target (``onnx.mixed_batch``): one more input, ``adapter_ids``
(int64 [batch_size]), and per site the stacks ``<site>.lora_A.weight`` [n+1, in, r_max] /
``<site>.lora_B.weight`` [n+1, r_max, out] as overridable inputs. Every input, the past K/V
included, keeps the batch on axis 0, so row i of every step runs with adapter
``adapter_ids[i]``. The folder has ``genai_config.json`` and the tokenizer files as a plain
KV-cache export, and ``model.adapter_ids.json``; ONNX Runtime GenAI cannot feed
``adapter_ids``, so ``lorafx generate`` decodes it with its onnxruntime loop.

Verification (ONNX Runtime against the PyTorch graph, rows on different adapters): a decode
step at past 3 (the traced shapes) and a prefill at past 0 with another length. fp16: the
wrapper cast (copy-on-write), the stacks cast once, checked against fp32 as in
``onnx.kv_export``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch
from torch import nn

from ..adapter.peft import Adapter
from ..deploy_format import IDS_INPUT, write_ids
from ..fileio import check_writable_dir
from ..ort.serving import AdapterSession
from .genai import write_genai_files
from .kv_cache import BATCH, kv_decoder, name_io, trace_inputs
from .kv_export import KvReport, check_kv_dtype, feeds_of, record
from .limits import judge, refuse
from .mixed_batch import MixedBatch, example_ids, mixed_module
from .mixed_export import batch_of, checked_outputs, mixed_program
from .prepare import cast_inputs, cast_module
from .report import op_histogram
from .save import save_program
from .verify import forward


def export_kv_mixed(model: nn.Module, path: str | Path,
                    adapters: Mapping[str, str | Path | Adapter] | Sequence[str | Path],
                    opset: int | None = None, verify: bool = True, atol: float | None = None,
                    providers: list[str] | None = None,
                    source: str | Path | None = None, dtype: str = "fp32") -> KvReport:
    """Export the Hugging Face decoder ``model`` with its KV cache and ``adapters`` (id k =
    k-th; 0 = the base model) chosen per row by ``adapter_ids``, to ``path`` (DIR/model.onnx)
    with GenAI's config, the tokenizer files of ``source`` and ``model.adapter_ids.json``;
    ``dtype`` "fp32" or "fp16"."""
    start = time.perf_counter()
    check_kv_dtype(dtype)
    path = Path(path)
    if not path.parent.exists():  # refused now, created once there is something to write
        check_writable_dir(path.parent.parent.resolve())
    kv = kv_decoder(model)
    mixed = mixed_module(kv.wrapper, kv.example_inputs, adapters, kv.dynamic_shapes)
    ids = example_ids(batch_of(kv.example_inputs), len(mixed.names) - 1)
    if verify:
        checked_outputs(mixed, kv.example_inputs, ids)
    traced, args = mixed, kv.example_inputs
    if dtype != "fp32":
        args = cast_inputs(kv.example_inputs, dtype)
        traced = mixed_module(cast_module(kv.wrapper, dtype), args, adapters,
                              kv.dynamic_shapes, dtype)
    program, found = mixed_program(traced, args, ids, kv.dynamic_shapes, opset)
    name_io(program.model, kv.layout)
    _name_ids(program.model, len(kv.layout.input_names()))
    path.parent.mkdir(exist_ok=True)
    external, _ = save_program(program, path)
    report = KvReport(path, False, kv.layout, dict(op_histogram(program.model)), external,
                      lora_inputs=found, dtype=dtype)
    del program
    report.copied = write_genai_files(path.parent, kv.layout, path.name, source)
    write_ids(path, mixed.names)
    if verify:
        verify_kv_mixed(report, mixed, kv.layout, kv.example_inputs, ids, atol, providers)
    report.seconds = time.perf_counter() - start
    return report


def _name_ids(model: Any, index: int) -> None:
    """The input after the KV decoder's: ``adapter_ids`` [batch_size]."""
    value = model.graph.inputs[index]
    value.name = IDS_INPUT
    value.shape = ir.Shape([ir.SymbolicDim(BATCH)])


def verify_kv_mixed(report: KvReport, mixed: MixedBatch, layout: Any, decode: tuple[Any, ...],
                    ids: torch.Tensor, atol: float | None = None,
                    providers: list[str] | None = None) -> None:
    """ONNX Runtime against PyTorch, rows on adapters ``ids``: a decode step (past 3) and a
    prefill (past 0, 5 tokens); raises LoraFxError above the limit (``onnx.limits``)."""
    sess = AdapterSession(report.path, providers or ["CPUExecutionProvider"])
    report.provider = sess.provider
    prefill, _ = trace_inputs(layout, seed=1, batch=len(ids), seq=5, past=0)
    for name, args in (("decode", decode), ("prefill", prefill)):
        got = sess.run(feeds_of(report, layout, args), rows=ids.tolist())
        base = forward(mixed, (*args, torch.zeros_like(ids)))  # every row on id 0: no adapter
        record(report, judge(name, got, forward(mixed, (*args, ids)), report.dtype, base,
                             atol=atol))
    refuse(report.checks, report.provider, report.path)
