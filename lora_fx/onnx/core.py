"""The one export: a *target* x a *form* x a *precision*, one orchestrator, one report, one
verification.

- target (``onnx.targets``): what is traced and how its file is named, where it is written
  with which side files, and the cases it is checked on: ``Plain`` (a module and its
  example inputs), ``Decoder`` (a Hugging Face decoder with its KV cache, ORT GenAI's folder);
- form (``onnx.forms``): how LoRA branches become ONNX and what adapter payload goes with
  them: ``Merged`` (W' = W + s·B@A folded: the base graph), ``Unmerged`` (MatMul branches
  with A', B' as overridable inputs), ``Mixed`` (stacked factors gathered by ``adapter_ids``);
- precision (``onnx.precision``): "fp32", "fp16", "bf16": the weights cast once after every
  fold in fp32; "int4", "int8": the fp32 file's base weights quantized (MatMulNBits); the
  file checked against fp32 PyTorch (``onnx.limits``).

    build (form on target) → trace → name → save → side files → cases → verify
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .. import memory
from .forms import Form, Merged
from .precision import (
    Quantization,
    measure_survival,
    quantization,
    quantized,
    scratch,
    weights_dtype,
)
from .report import ExportReport, op_histogram
from .rules import forget_rewriter_state
from .targets import Target
from .verify import forward, torch_max_diff, verify_cases


@dataclass
class Job:
    """One export's choices."""

    path: Path
    target: Target
    form: Form
    precision: str = "fp32"
    opset: int | None = None
    verify: bool = True
    atol: float | None = None               # the limit's absolute part (default: precision's)
    providers: list[Any] | None = None
    release: bool = False                   # free the model's weights before verifying
    quant_block: int = 32                   # int4 / int8: rows per quantization block
    accuracy_level: int | None = None       # int4 / int8: MatMulNBits' accuracy_level
    fuse: bool = False                      # fp32 KV decoders: ORT's fused ops (onnx.fuse)


def export(job: Job) -> ExportReport:
    """Run ``job``: write its file(s), verify them, return the report (see the module). A
    merged int4 / int8 export also exports the base model quantized alike into a scratch
    folder, to report how much of the adapter survived (``onnx.precision``)."""
    weights = weights_dtype(job.precision)  # refuses an unknown precision before any work
    job.target.check(job.path, weights, job.form)
    quant = quantization(job.precision, job.quant_block, job.accuracy_level)
    base = job.target.without_adapter(job.form) if quant and job.verify else None
    if base is None:
        return _export(job, weights, quant, None)
    with scratch() as folder:
        base_path = Path(folder) / job.path.name
        _export(replace(job, path=base_path, target=base, form=Merged(None), verify=False,
                        release=False), weights, quant, None)  # its tensors are the model's
        return _export(job, weights, quant, base_path)


def _export(job: Job, weights: str, quant: Quantization | None, base_path: Path | None
            ) -> ExportReport:
    start = time.perf_counter()
    built = job.form.build(job.target, weights, job.verify, job.release)
    program, lora_inputs = job.form.trace(built, job.target, job.opset, job.release)
    job.target.name_io(program.model, built)
    fused = job.target.fuse(program.model) if job.fuse and weights == "fp32" else {}
    if quant is not None:
        program.model = quantized(program.model, quant)
    memory.trim()  # what tracing and translating freed: not resident while saving
    external, layout = job.target.save(program, job.path)
    report = ExportReport(job.path, built.merged, 0.0, external,
                          dict(op_histogram(program.model)), dtype=job.precision,
                          lora_inputs=lora_inputs)
    report.extras.update(job.target.notes(program.model, built))
    report.extras.update({"fused": fused} if fused else {})
    if lora_inputs:
        report.extras["lora_inputs"] = lora_inputs
    axes = job.target.symbolic(program.model, built) if job.verify else None
    del program  # its IR may hold tensors of its own (folded constants): free them first
    forget_rewriter_state()
    job.target.side_files(report, built)
    if weights != "fp32":
        error = torch_max_diff(forward(built.module, built.call_args(built.args)),
                               built.reference(job.target.args))
        report.extras.update(dtype=weights, error_vs_fp32={"pytorch": error})
    cases = job.target.cases(report, built, axes) if job.verify else []
    if job.release:
        built.release()
        memory.trim()
    if cases:
        verify_cases(report, cases, job.atol, job.providers, job.precision, lean=job.release,
                     layout=layout)
    if cases and base_path is not None:
        report.survival = measure_survival(job.path, base_path, cases[0], job.precision,
                                           job.providers)
    report.seconds = time.perf_counter() - start
    return report
