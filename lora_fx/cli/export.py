"""``lorafx export``: the model, merged or not, to ONNX.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from ..api import export_onnx
from ..capture.trace import capture
from ..fileio import check_writable_dir
from ..load.model import load_model
from ..model.adapters import load_adapter
from .common import echo_json
from .export_kv import export_kv_command


@click.command("export")
@click.argument("model")
@click.option("--adapter", "adapter_dir", type=click.Path(), help="Adapter directory.")
@click.option("--merge/--no-merge", default=True, show_default=True,
              help="Fold the adapter into the weights, or keep the branches.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output .onnx file.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare ONNX Runtime with PyTorch on the example inputs (atol 1e-4).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32",
              show_default=True, help="Weight precision: merged in fp32, cast once; the error "
                                      "against fp32 is reported.")
@click.option("--kv-cache", is_flag=True,
              help="A decoder with its KV cache for generation (-o DIR/model.onnx): ORT "
                   "GenAI's names, genai_config.json and the tokenizer files beside it.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
def export_command(model: str, adapter_dir: str | None, merge: bool, output: str, opset: int | None,
           verify: bool, dtype: str, kv_cache: bool, as_json: bool) -> None:
    """Export MODEL (with --adapter: merged or not) to ONNX."""

    if kv_cache:
        export_kv_command(model, adapter_dir, merge, output, opset, verify, dtype, as_json)
        return
    check_writable_dir(Path(output).parent.resolve())
    loaded = load_model(model)
    if adapter_dir:
        gm = load_adapter(loaded.module, loaded.example_inputs, adapter_dir,
                              loaded.dynamic_shapes)
    else:
        gm = capture(loaded.module, loaded.example_inputs, loaded.dynamic_shapes)
    gm.eval()
    report = export_onnx(gm, loaded.example_inputs, output, merge=merge, opset=opset,
                         verify=verify, dynamic_shapes=loaded.dynamic_shapes, dtype=dtype,
                         model=loaded.module, release=True)  # this process is done with it
    data: dict[str, Any] = {"output": str(report.path), "merged": bool(adapter_dir) and merge,
            "seconds": round(report.seconds, 3), "external_data": report.external_data,
            "nodes": sum(report.op_histogram.values()), "op_histogram": report.op_histogram,
            "max_abs_diff": report.max_abs_diff, "provider": report.provider,
            "bytes": os.path.getsize(report.path)}
    data.update({**report.extras, "dtype": dtype})
    if as_json:
        echo_json(data)
        return
    kind = "base model" if not adapter_dir else ("merged" if merge else "unmerged")
    click.echo(f"wrote {output} ({kind}, {data['nodes']} nodes, {data['bytes'] / 1e6:.1f} MB) "
               f"in {report.seconds:.1f} s")
    if report.max_abs_diff is not None:
        click.echo(f"verified: max |ONNX Runtime - PyTorch| = {report.max_abs_diff:.3g} "
                   f"on {report.provider}")
    if "error_vs_fp32" in report.extras:
        errors = ", ".join(f"{k} {v:.3g}" for k, v in report.extras["error_vs_fp32"].items())
        click.echo(f"{dtype} error against fp32 (max abs): {errors}")

