"""GPU check of deployment: merged and unmerged models on ONNX Runtime's CUDA provider.

    python benchmarks/gpu_check.py              # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --rehearse   # the same steps, the CPU provider standing in

Without CUDA (no CUDAExecutionProvider in onnxruntime, or no driver) it prints
``no CUDA: the GPU path is unverified`` and exits 0. Otherwise, on one random GPT-2-shaped model
(no download) with adapter X (rank r, exported) and adapter Y (rank 2r, converted):

1. equality: the CUDA session's outputs against the CPU session's, for the merged model, the
   unmerged model with no adapter, with Y through ``RunOptions.add_active_adapter`` and with Y
   bound by ``lora_fx.ort.serving`` (I/O binding, parameters on the GPU); and the CUDA outputs
   against PyTorch's fp32 forward (PEFT-free: lorafx's injected model), limit 1e-3 (TF32);
2. precision: fp16 and bf16 merged exports verified on the CUDA provider (ONNX Runtime's CPU
   provider has no bf16 kernels), error against fp32 reported;
3. latency at batch 1 and 16: ONNX Runtime CUDA (merged; unmerged + Y run; unmerged + Y bound,
   inputs and outputs kept on the GPU) against PyTorch on the same GPU (merged and injected
   models, eager), medians of ``--repeat`` interleaved calls.

Prints JSON and a Markdown table; writes ``$OUT/gpu_check.json`` when ``OUT`` is set, else
``benchmarks/results/gpu_check.json``. Exit status 1 when an equality check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
CPU = ["CPUExecutionProvider"]
CUDA: list[Any] = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]


def cuda_ready() -> bool:
    import onnxruntime as ort

    from lora_fx.ort.runtime import cuda_driver_present

    return "CUDAExecutionProvider" in ort.get_available_providers() and cuda_driver_present()


def cuda_providers() -> list[Any]:
    """CUDA with TF32 off (fp32 equality), or plain CUDA if this build rejects the option."""
    import onnx
    from onnx import helper

    from lora_fx.errors import LoraFxError
    from lora_fx.ort.runtime import open_session

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    with tempfile.TemporaryDirectory() as tmp:
        model = helper.make_model(graph, ir_version=8,
                                  opset_imports=[helper.make_opsetid("", 17)])
        onnx.save(model, f"{tmp}/probe.onnx")
        try:
            open_session(f"{tmp}/probe.onnx", CUDA)
            return CUDA
        except LoraFxError:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def prepare(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import torch
    from bench_deploy import build, random_adapter

    import lora_fx
    from lora_fx.api import export_onnx
    from lora_fx.ort.adapters import convert_adapter

    model = build(args.layers, args.d, 1000, 128)
    ids = torch.randint(1, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    gm = random_adapter(model, ids, args.rank, seed=1)
    export_onnx(gm, (ids,), tmp / "merged.onnx", merge=True)
    export_onnx(gm, (ids,), tmp / "unmerged.onnx", merge=False)
    other = random_adapter(model, ids, 2 * args.rank, seed=2)
    lora_fx.save_adapter(other, tmp / "y")
    convert_adapter(tmp / "y", tmp / "y.onnx_adapter", model=tmp / "unmerged.onnx")
    return {"model": model, "gm": gm, "other": other, "ids": ids, "tmp": tmp}


def equality(ctx: dict[str, Any], device: list[str]) -> dict[str, float]:
    import numpy as np
    import torch

    from lora_fx.ort.serving import AdapterSession

    tmp = ctx["tmp"]
    ids = torch.randint(1, 1000, (3, 24), generator=torch.Generator().manual_seed(5))
    feeds = {"input_ids": ids.numpy()}
    with torch.no_grad():
        want_x = ctx["gm"](ids).logits.numpy()
        want_y = ctx["other"](ids).logits.numpy()
    out: dict[str, float] = {}
    for name in ("merged", "unmerged"):
        cpu, dev = AdapterSession(tmp / f"{name}.onnx", CPU), AdapterSession(
            tmp / f"{name}.onnx", device)
        out[f"{name}: provider"] = dev.provider  # type: ignore[assignment]
        runs = {"defaults": (None, False, want_x)}
        if name == "unmerged":
            for s in (cpu, dev):
                s.load("y", tmp / "y.onnx_adapter")
            runs.update({"adapter Y": ("y", False, want_y), "adapter Y bound": ("y", True,
                                                                               want_y)})
        for label, (adapter, bound, want) in runs.items():
            got = (dev.run_bound if bound else dev.run)(feeds, adapter)[0]
            ref = cpu.run(feeds, adapter)[0]
            out[f"{name} {label}: |device - cpu|"] = float(np.abs(got - ref).max())
            out[f"{name} {label}: |device - pytorch|"] = float(np.abs(got - want).max())
    return out


def precision(ctx: dict[str, Any], device: list[str]) -> dict[str, Any]:
    from lora_fx.api import export_onnx
    from lora_fx.errors import LoraFxError

    out: dict[str, Any] = {}
    for dtype in ("fp16", "bf16"):
        try:
            report = export_onnx(ctx["gm"], (ctx["ids"],), ctx["tmp"] / f"m_{dtype}.onnx",
                                 dtype=dtype, model=ctx["model"], providers=device)
            out[dtype] = {"provider": report.provider, **report.extras}
        except LoraFxError as err:
            out[dtype] = {"error": str(err)}
    return out


def latency(ctx: dict[str, Any], device: list[str], args: argparse.Namespace
            ) -> list[dict[str, Any]]:
    """Median ms per variant and batch, variants interleaved; PyTorch on the same GPU."""
    import numpy as np
    import onnxruntime as ort
    import torch

    import lora_fx
    from lora_fx.ort.serving import AdapterSession

    merged = AdapterSession(ctx["tmp"] / "merged.onnx", device)
    unmerged = AdapterSession(ctx["tmp"] / "unmerged.onnx", device)
    unmerged.load("y", ctx["tmp"] / "y.onnx_adapter")
    kind, index = unmerged.device
    gpu = torch.device("cuda") if kind == "cuda" and torch.cuda.is_available() else None
    torch_models = {}
    if gpu is not None:
        torch_models = {"pytorch merged": lora_fx.merge(ctx["other"]).to(gpu).eval(),
                        "pytorch injected": ctx["other"].to(gpu).eval()}
    rows = []
    for batch in args.batches:
        ids = np.random.default_rng(batch).integers(1, 1000, (batch, args.seq))
        on_dev = {"input_ids": ort.OrtValue.ortvalue_from_numpy(ids, kind, index)}
        feeds = {"input_ids": ids}
        calls = {
            "ort merged": lambda f=feeds: merged.run(f),
            "ort unmerged + Y (run)": lambda f=feeds: unmerged.run(f, "y"),
            "ort unmerged + Y (bound)": lambda d=on_dev: unmerged.run_bound(d, "y",
                                                                           to_host=False),
        }
        for name, module in torch_models.items():
            t_ids = torch.from_numpy(ids).to(gpu)
            calls[name] = lambda m=module, t=t_ids: _torch_call(m, t)
        times: dict[str, list[float]] = {k: [] for k in calls}
        for i in range(args.warmup + args.repeat):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
        for name, t in times.items():
            rows.append({"variant": name, "batch": batch, "seq": args.seq,
                         "median_ms": 1e3 * statistics.median(t)})
    if gpu is None:
        rows.append({"variant": "pytorch", "note": "PyTorch has no CUDA here: not timed"})
    return rows


def _torch_call(module: Any, ids: Any) -> None:
    import torch

    with torch.no_grad():
        module(ids)
    torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rehearse", action="store_true",
                   help="run every step with the CPU provider standing in for CUDA")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not args.rehearse and not cuda_ready():
        print("no CUDA: the GPU path is unverified (onnxruntime offers no usable "
              "CUDAExecutionProvider on this machine)")
        return 0
    device = CPU if args.rehearse else cuda_providers()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = prepare(args, Path(tmp))
        result = {"device": "cpu (rehearsal)" if args.rehearse else "cuda",
                  "equality": equality(ctx, device), "precision": precision(ctx, device),
                  "latency": latency(ctx, device, args), "config": vars(args)}
    print(json.dumps(result, indent=2, default=str))
    print("\n| variant | batch x seq | median ms |\n| --- | --- | ---: |")
    for row in result["latency"]:
        if "median_ms" in row:
            print(f"| {row['variant']} | {row['batch']} x {row['seq']} | "
                  f"{row['median_ms']:.3f} |")
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    bad = {k: v for k, v in result["equality"].items()
           if isinstance(v, float) and not v <= 1e-3}
    if bad:
        print(f"FAILED equality: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
