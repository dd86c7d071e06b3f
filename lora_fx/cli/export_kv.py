"""``lorafx export --kv-cache``: a decoder with its KV cache, in a folder ORT GenAI loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from ..errors import LoraFxError
from ..fileio import made_dirs
from ..load.model import load_model
from ..onnx.export import export_kv
from ..onnx.targets import check_kv_dtype
from .common import checks_json, echo_json, echo_survival, survival_json, verified_line


def export_kv_command(model: str, adapter_dir: str | None, merge: bool, output: str,
                      opset: int | None, verify: bool, atol: float | None, dtype: str,
                      as_json: bool, quant: dict[str, Any]) -> None:
    """Export MODEL (a Hugging Face decoder) with its KV cache to ``output`` (DIR/model.onnx),
    with genai_config.json, the tokenizer files and (unmerged) the adapter file beside it."""
    check_kv_dtype(dtype)
    out = Path(output)
    if out.suffix != ".onnx":
        raise LoraFxError(f"--kv-cache writes a folder: pass -o DIR/model.onnx, not {output}")
    loaded = load_model(model)
    with made_dirs(out.parent):  # the folder and its missing parents; removed if it fails
        report = export_kv(loaded.module, out, adapter=adapter_dir, merge=merge, opset=opset,
                           verify=verify, atol=atol, source=loaded.extras.get("directory"),
                           adapter_name=Path(adapter_dir).name if adapter_dir else "adapter",
                           dtype=dtype, **quant)
    layout = report.layout
    assert layout is not None  # a KV-cache export's report has it
    kind = "base model" if not adapter_dir else ("merged" if merge else "unmerged")
    data: dict[str, Any] = {
        "output": str(report.path), "kind": kind, "kv_cache": True,
        "seconds": round(report.seconds, 3), "layers": layout.layers,
        "kv_heads": layout.kv_heads, "head_dim": layout.head_dim, "vocab": layout.vocab,
        "context_length": layout.positions, "inputs": layout.input_names(),
        "outputs": layout.output_names(), "genai_config": str(out.parent / "genai_config.json"),
        "tokenizer_files": report.copied, "lora_inputs": report.lora_inputs,
        "adapter_file": str(report.adapter_file) if report.adapter_file else None,
        "max_abs_diff": report.errors, "provider": report.provider,
        "dtype": report.dtype, "tolerance": report.limits or None,
        "nodes": sum(report.op_histogram.values()), "bytes": os.path.getsize(report.path),
        "external_data": report.external_data, "checks": checks_json(report.checks),
        "survival": survival_json(report.survival),
        "fused": report.extras.get("fused", {})}  # fused op -> count (onnx.fuse)
    if as_json:
        echo_json(data)
        return
    click.echo(f"wrote {output} ({kind} decoder with KV cache: {layout.layers} layers, "
               f"{layout.kv_heads} KV heads x {layout.head_dim}, {data['nodes']} nodes, "
               f"{data['bytes'] / 1e6:.1f} MB) in {report.seconds:.1f} s")
    extra = ", ".join(["genai_config.json", *report.copied] +
                      ([report.adapter_file.name] if report.adapter_file else []))
    click.echo(f"beside it: {extra}")
    if report.adapter_file:
        click.echo("no adapter active: the base model; activate the exported adapter with "
                   f"`lorafx generate {out.parent} --adapter {report.adapter_file}`")
    if report.checks:
        click.echo(verified_line(report.checks, report.provider))
    echo_survival(report.survival)
