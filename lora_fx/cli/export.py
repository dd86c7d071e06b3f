"""``lorafx export``: the model, merged or not, to ONNX.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from ..api import export_kv_mixed, export_mixed, export_onnx
from ..capture.trace import capture
from ..deploy_format import ids_file, read_ids
from ..errors import LoraFxError
from ..fileio import check_output_file, made_dirs
from ..load.device import place, resolve_device
from ..load.model import load_model
from ..model.adapters import load_adapter
from ..onnx.targets import check_kv_dtype
from ..ort.adapter_sets import named_dirs
from .common import checks_json, echo_json, echo_survival, survival_json, verified_line
from .export_kv import export_kv_command
from .options import device_option


@click.command("export")
@click.argument("model")
@click.option("--adapter", "adapters", multiple=True,
              help="Adapter directory; with --mixed-batch repeat it ([NAME=]DIR, id k = k-th).")
@click.option("--merge/--no-merge", default=True, show_default=True,
              help="Fold the adapter into the weights, or keep the branches.")
@click.option("--mixed-batch", is_flag=True,
              help="One graph, an adapter per batch row: input adapter_ids (0 = base, k = the "
                   "k-th --adapter); writes OUT's NAME.adapter_ids.json.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output .onnx file.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare ONNX Runtime with PyTorch on the example inputs: within atol + "
                   "rtol x max|y| (fp32: 1e-4 + 2e-5 x max|y|), and within a share of the "
                   "adapter's own effect.")
@click.option("--atol", type=click.FloatRange(min=0), default=None,
              help="The absolute part of the verification limit (default: the precision's "
                   "own, 1e-4 for fp32).")
@click.option("--quant-block", type=click.Choice(["16", "32", "64", "128", "256"]),
              default="32", show_default=True,
              help="int4/int8: rows of a weight quantized together (one scale per block).")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=None,
              help="int4/int8: MatMulNBits' accuracy_level (ONNX Runtime's name; 4 computes in "
                   "int8 on the CPU, as ORT GenAI's CPU int4 models do).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16", "int4", "int8"]),
              default="fp32",
              show_default=True, help="Weight precision: merged in fp32, cast once; the error "
                                      "against fp32 is reported.")
@click.option("--kv-cache", is_flag=True,
              help="A decoder with its KV cache for generation (-o DIR/model.onnx): ORT "
                   "GenAI's names, genai_config.json and the tokenizer files beside it.")
@click.option("--fuse", is_flag=True,
              help="--kv-cache: RMSNorm and its residual add become ONNX Runtime's fused ops "
                   "where onnxscript's rules match (decode ~0.9x the time; the rewrite adds "
                   "minutes to a 30-layer export, so it is off by default).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
@device_option
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def export_command(model: str, adapters: tuple[str, ...], merge: bool, mixed_batch: bool,
                   output: str, opset: int | None, verify: bool, atol: float | None,
                   quant_block: str, accuracy_level: int | None, dtype: str, kv_cache: bool,
                   fuse: bool, as_json: bool, device: str | None, force: bool) -> None:
    """Export MODEL (with --adapter: merged or not; several: --mixed-batch) to ONNX."""
    check_output_file(output, force)  # before any work; missing folders are made to write
    quant: dict[str, Any] = {"quant_block": int(quant_block), "accuracy_level": accuracy_level}
    if kv_cache:  # only the KV decoders are fused (onnx.fuse)
        quant["fuse"] = fuse
    if device is not None and (mixed_batch or len(adapters) > 1 or kv_cache):
        raise LoraFxError("--device with --kv-cache or several adapters is not supported yet: "
                          "export those on the CPU (drop --device)")
    if mixed_batch or len(adapters) > 1:
        _export_mixed(model, adapters, mixed_batch, output, opset, verify, atol, dtype,
                      kv_cache, as_json, quant)
        return
    adapter_dir = adapters[0] if adapters else None
    if kv_cache:
        export_kv_command(model, adapter_dir, merge, output, opset, verify, atol, dtype,
                          as_json, quant)
        return
    where = resolve_device(device)
    loaded = place(load_model(model), where)  # capture and merge where the weights live
    if adapter_dir:
        gm = load_adapter(loaded.module, loaded.example_inputs, adapter_dir,
                          loaded.dynamic_shapes,
                          model_names=[model, loaded.extras.get("directory", "")])
    else:
        gm = capture(loaded.module, loaded.example_inputs, loaded.dynamic_shapes)
    gm.eval()
    with made_dirs(Path(output).parent):  # removed again if the export fails
        report = export_onnx(gm, loaded.example_inputs, output, merge=merge, opset=opset,
                             verify=verify, atol=atol, dynamic_shapes=loaded.dynamic_shapes,
                             dtype=dtype, **quant,
                             model=loaded.module, release=True)  # this process is done with it
    data: dict[str, Any] = {"output": str(report.path), "merged": bool(adapter_dir) and merge,
            "seconds": round(report.seconds, 3), "external_data": report.external_data,
            "nodes": sum(report.op_histogram.values()), "op_histogram": report.op_histogram,
            "max_abs_diff": report.max_abs_diff, "provider": report.provider,
            "bytes": os.path.getsize(report.path), "checks": checks_json(report.checks),
            "survival": survival_json(report.survival)}
    data.update({**report.extras, "dtype": dtype})
    if as_json:
        echo_json(data)
        return
    kind = "base model" if not adapter_dir else ("merged" if merge else "unmerged")
    click.echo(f"wrote {output} ({kind}, {data['nodes']} nodes, {data['bytes'] / 1e6:.1f} MB) "
               f"in {report.seconds:.1f} s")
    if report.checks:
        tf32 = report.extras.get("verification", {}).get("tf32")
        click.echo(verified_line(report.checks, report.provider,
                                 f", TF32 {tf32}" if tf32 else ""))
    echo_survival(report.survival)
    for name, axes in report.extras.get("fixed_axes", {}).items():
        click.echo(f"note: input {name} has fixed axes {axes}: the model fixes them, so the "
                   "file runs only at the example's sizes there", err=True)
    if "error_vs_fp32" in report.extras:
        errors = ", ".join(f"{k} {v:.3g}" for k, v in report.extras["error_vs_fp32"].items())
        click.echo(f"{dtype} error against fp32 (max abs): {errors}")


def _export_mixed(model: str, adapters: tuple[str, ...], mixed_batch: bool, output: str,
                  opset: int | None, verify: bool, atol: float | None, dtype: str,
                  kv_cache: bool, as_json: bool, quant: dict[str, Any]) -> None:
    """``--mixed-batch``: every ``--adapter`` ([NAME=]DIR) stacked in one graph (with
    ``--kv-cache``: the decoder with its cache, in a folder)."""
    if not mixed_batch:
        raise LoraFxError(f"{len(adapters)} --adapter given: pass --mixed-batch to serve them "
                          "from one graph (an adapter per row), or export one at a time")
    if kv_cache:
        check_kv_dtype(dtype)
    if kv_cache and Path(output).suffix != ".onnx":
        raise LoraFxError(f"--kv-cache writes a folder: pass -o DIR/model.onnx, not {output}")
    named = named_dirs(adapters)
    loaded = load_model(model)
    with made_dirs(Path(output).parent):  # removed again if the export fails
        if kv_cache:
            report: Any = export_kv_mixed(loaded.module, output, named, opset=opset,
                                          verify=verify, atol=atol, dtype=dtype, **quant,
                                          source=loaded.extras.get("directory"))
        else:
            report = export_mixed(loaded.module, loaded.example_inputs, named, output,
                                  opset=opset, verify=verify, atol=atol,
                                  dynamic_shapes=loaded.dynamic_shapes, dtype=dtype, **quant)
    names = read_ids(report.path) or []
    data: dict[str, Any] = {"output": str(report.path), "mixed_batch": True,
                            "kv_cache": kv_cache, "adapters": {n: k for k, n in enumerate(names)},
                            "ids_file": str(ids_file(report.path)),
                            "seconds": round(report.seconds, 3),
                            "nodes": sum(report.op_histogram.values()),
                            "max_abs_diff": report.max_abs_diff, "provider": report.provider,
                            "lora_inputs": report.extras["lora_inputs"] if not kv_cache
                            else report.lora_inputs, "bytes": os.path.getsize(report.path),
                            "dtype": dtype, "checks": checks_json(report.checks)}
    if not kv_cache and "error_vs_fp32" in report.extras:
        data["error_vs_fp32"] = report.extras["error_vs_fp32"]
    if kv_cache and report.limits:
        data["tolerance"] = max(report.limits.values())
    if as_json:
        echo_json(data)
        return
    ids = ", ".join(f"{k}={n}" for n, k in data["adapters"].items())
    kind = "decoder with KV cache, " if kv_cache else ""
    click.echo(f"wrote {output} ({kind}mixed batch: {ids}; {len(data['lora_inputs'])} sites, "
               f"{data['nodes']} nodes, {data['bytes'] / 1e6:.1f} MB) in {report.seconds:.1f} s")
    click.echo(f"adapter ids: {data['ids_file']}")
    if report.checks:
        click.echo(verified_line(report.checks, report.provider))
    if "error_vs_fp32" in data:
        errors = ", ".join(f"{k} {v:.3g}" for k, v in data["error_vs_fp32"].items())
        click.echo(f"{dtype} error against fp32 (max abs): {errors}")
