"""Export a decoder with its KV cache (``onnx.kv_cache``) into a folder ORT GenAI loads.

``DIR/model.onnx`` (GenAI's names), ``DIR/genai_config.json``, the tokenizer files of the
model's directory, and for an unmerged export ``DIR/<adapter>.onnx_adapter``.

- Merged (or no adapter): every branch folded, W' = W + s·B@A; the file is the base decoder's
  graph with new weights.
- Unmerged: each site keeps Add(y, MatMul(MatMul(x, A'), B')) with A', B' overridable inputs
  (``onnx.unmerged``) whose defaults are ZERO, so with no adapter active the file decodes as
  the base model (Δ = 0); the exported adapter is written beside it as an ONNX Runtime adapter
  file (A' = Aᵀ, B' = s·Bᵀ), swapped in per generator (GenAI ``set_active_adapter``) or per run
  (``RunOptions.add_active_adapter``), like any ``lorafx convert-adapter`` file.

Verification (ONNX Runtime against the PyTorch graph): a decode step at past 3 (the traced
shapes) and a prefill at past 0 with another batch and length; unmerged, the defaults against
the base model and the adapter file against the adapter.

fp16 (``dtype``): merged or converted in fp32, every weight cast once and the wrapper captured
again in fp16 (``prepare.lowered``), so its KV cache inputs and outputs are fp16, as ONNX
Runtime GenAI's fp16 decoders; verified against the fp32 PyTorch outputs within fp16's limit
(``onnx.limits``). bf16 is refused: ONNX Runtime's CPU provider has no
bf16 kernels to verify such a decoder with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter.peft import Adapter, read_adapter
from ..capture.program import captured_program
from ..capture.trace import capture
from ..deploy_format import A_SUFFIX, B_SUFFIX
from ..errors import LoraFxError
from ..fileio import check_writable_dir
from ..graph.attrs import set_attr_cow
from ..graph.state import get_state
from ..model.adapters import apply_adapter, to_adapter
from ..ort.adapters import onnx_params, write_ort_adapter
from ..ort.runtime import without_tf32
from ..ort.serving import AdapterSession
from .export import trace
from .genai import write_genai_files
from .kv_cache import KvModule, kv_decoder, name_io, trace_inputs
from .limits import Check, judge, refuse
from .prepare import Prepared, cast_inputs, prepare
from .report import op_histogram
from .save import save_program
from .unmerged import branch_paths
from .verify import forward


@dataclass
class KvReport:
    path: Path
    merged: bool
    layout: Any                              # kv_cache.DecoderLayout
    op_histogram: dict[str, int]
    external_data: bool
    seconds: float = 0.0
    adapter_file: Path | None = None         # unmerged: the exported adapter, beside the model
    lora_inputs: dict[str, dict[str, int]] = field(default_factory=dict)
    copied: list[str] = field(default_factory=list)          # tokenizer files
    max_abs_diff: dict[str, float] = field(default_factory=dict)   # check → max |ORT − torch|
    limits: dict[str, float] = field(default_factory=dict)  # check → its limit (onnx.limits)
    checks: list[Check] = field(default_factory=list)       # one per verified case
    provider: str | None = None
    dtype: str = "fp32"


def export_kv(model: nn.Module, path: str | Path, adapter: str | Path | Adapter | None = None,
              merge: bool = True, opset: int | None = None, verify: bool = True,
              atol: float | None = None, providers: list[str] | None = None,
              source: str | Path | None = None, adapter_name: str = "adapter",
              dtype: str = "fp32") -> KvReport:
    """Export the Hugging Face decoder ``model`` (with ``adapter``: a directory or an
    ``Adapter``, merged or not) with its KV cache to ``path`` and GenAI's files beside it.

    ``source``: the model's ``save_pretrained`` directory (tokenizer files are copied from it).
    ``adapter_name``: the stem of the adapter file an unmerged export writes. ``dtype``:
    "fp32" or "fp16" (the weights, the cache and the adapter file).
    """
    start = time.perf_counter()
    check_kv_dtype(dtype)
    path = Path(path)
    kv = kv_decoder(model)
    if not path.parent.exists():  # refused now, created once there is something to write
        check_writable_dir(path.parent.parent.resolve())
    if adapter is None:
        gm = capture(kv.wrapper, kv.example_inputs, kv.dynamic_shapes, method="export")
    else:
        loaded = read_adapter(adapter) if not isinstance(adapter, Adapter) else adapter
        gm = apply_adapter(kv.wrapper, kv.example_inputs, loaded, kv.dynamic_shapes,
                           where=str(adapter) if not isinstance(adapter, Adapter) else "adapter")
    gm.eval()
    unmerged = not merge and get_state(gm) is not None
    # the adapter file of an unmerged export, refused (DoRA, modules_to_save, ...) before any
    # file is written
    params = onnx_params(to_adapter(gm), dtype, str(adapter)) if unmerged else {}
    prep, program, lora = kv_program(gm, kv, merge, opset, dtype)
    name_io(program.model, kv.layout)
    path.parent.mkdir(exist_ok=True)  # the export is a folder
    external, _ = save_program(program, path)
    report = KvReport(path, not unmerged and adapter is not None, kv.layout,
                      dict(op_histogram(program.model)), external, lora_inputs=lora,
                      dtype=dtype)
    del program
    report.copied = write_genai_files(path.parent, kv.layout, path.name, source)
    if unmerged:
        report.adapter_file = write_ort_adapter(
            params, path.parent / f"{adapter_name}.onnx_adapter", force=True)
    if verify:
        verify_kv(report, kv, prep.reference, atol, providers)
    report.seconds = time.perf_counter() - start
    return report


def check_kv_dtype(dtype: str) -> None:
    """Refuse a KV-cache dtype other than fp32 and fp16, with why."""
    if dtype not in ("fp32", "fp16"):
        raise LoraFxError(f"--kv-cache exports fp32 or fp16, not --dtype {dtype}: ONNX Runtime "
                          "has no bf16 kernels on the CPU to verify such a decoder; use fp16")


def kv_program(gm: nn.Module, kv: KvModule, merge: bool, opset: int | None,
               dtype: str = "fp32") -> tuple[Prepared, Any, dict[str, dict[str, int]]]:
    """The export's stages 1-2 (``onnx.export``) for ``gm``, a capture of ``kv.wrapper`` (maybe
    injected): merged (the capture's own program reused, its axes already dynamic), or
    unmerged with zero adapter defaults; fp16: ``kv.wrapper`` cast and captured again
    (``prepare.lowered``; the wrapper calls its decoder over its own, cast, children).
    Returns (the prepared modules, the ONNXProgram, the unmerged file's LoRA inputs)."""
    prep = prepare(gm, kv.example_inputs, merge, dtype, kv.wrapper, kv.dynamic_shapes,
                   inplace=False)
    if prep.unmerged:
        zero_defaults(prep.module)
    reuse = prep.dtype is None and not prep.unmerged and \
        captured_program(prep.module) is not None
    program, extras = trace(prep, None if reuse else kv.dynamic_shapes, opset, release=False)
    return prep, program, extras.get("lora_inputs", {})


def zero_defaults(deploy: nn.Module) -> nn.Module:
    """``deploy`` (a ``deploy_module``) with every A' and B' zero (Δ = 0: the base model when
    no adapter is active); shapes, and so the exported ranks, kept."""
    for path in branch_paths(deploy).values():
        for key in (path + A_SUFFIX, path + B_SUFFIX):
            value = deploy.get_parameter(key)
            set_attr_cow(deploy, key, nn.Parameter(torch.zeros_like(value),
                                                   requires_grad=False))
    return deploy


def verify_kv(report: KvReport, kv: KvModule, reference: nn.Module, atol: float | None = None,
              providers: list[str] | None = None) -> None:
    """ONNX Runtime against PyTorch at past 3 (the traced shapes) and at past 0 (a prefill of
    batch 1, 5 tokens); for an unmerged file, also with its adapter file active. A case that
    runs the adapter is also bounded by its own effect (``kv.wrapper``, the base decoder,
    on the same inputs). Raises LoraFxError above the limit (``onnx.limits``)."""
    # CUDA with TF32 off: fp32 MatMuls comparable with PyTorch's (ort.runtime)
    sess = AdapterSession(report.path, without_tf32(providers or ["CPUExecutionProvider"]))
    report.provider = sess.provider
    prefill, _ = trace_inputs(kv.layout, seed=1, batch=1, seq=5, past=0)
    unmerged = report.adapter_file is not None
    adapted = reference is not kv.wrapper
    base = kv.wrapper if unmerged else reference  # the file with no adapter active
    checks: list[tuple[str, tuple[Any, ...], nn.Module, str | None]] = [
        ("decode", kv.example_inputs, base, None), ("prefill", prefill, base, None)]
    if unmerged:
        sess.load("exported", report.adapter_file)  # type: ignore[arg-type]
        checks += [("decode+adapter", kv.example_inputs, reference, "exported"),
                   ("prefill+adapter", prefill, reference, "exported")]
    for name, args, module, adapter in checks:
        got = sess.run(feeds_of(report, kv.layout, args), adapter)
        without = forward(kv.wrapper, args) if adapted and module is reference else None
        record(report, judge(name, got, forward(module, args), report.dtype, without,
                             atol=atol))
    refuse(report.checks, report.provider, report.path)


def feeds_of(report: KvReport, layout: Any, args: tuple[Any, ...]) -> dict[str, Any]:
    """The file's feeds for the fp32 example ``args``: named, flat, cast to its dtype."""
    fed = args if report.dtype == "fp32" else cast_inputs(args, report.dtype)
    return dict(zip(layout.input_names(), flat_inputs(fed), strict=True))


def record(report: KvReport, check: Check) -> None:
    """Keep ``check`` in the report (and its error and limit under its name)."""
    report.checks.append(check)
    report.max_abs_diff[check.name] = check.max_abs_diff
    report.limits[check.name] = check.limit


def flat_inputs(args: tuple[Any, ...]) -> list[Any]:
    out: list[Any] = []
    for a in args:
        out.extend(a if isinstance(a, list) else [a])
    return out
