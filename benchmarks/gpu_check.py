"""All GPU checks and benchmarks of lorafx in one prepared script (issues 15 and earlier).

    python benchmarks/gpu_check.py                      # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --only checks --only latency   # a part (see --only)
    python benchmarks/gpu_check.py --device cpu --quick # the CPU rehearsal CI smoke-tests

Sections (``--only``, repeatable; default all):

- ``checks``: what users hit (``gpu_portability``): inject on the CPU then ``.to(cuda)``,
  ``.to(bf16)`` and merge there, against PEFT moved the same way; capture on the GPU then move
  to the CPU; fp32 adapters on a bf16 base (both branch computes) against PEFT; export of a
  GPU-resident model (fp32, bf16, fp16) verified on CUDA with TF32 off;
- ``equality``: on one random GPT-2-shaped model (no download) with adapter X (rank r,
  exported) and Y (rank 2r, converted): CUDA session outputs against the CPU session's and
  PyTorch's (merged; unmerged with the defaults, with Y through ``add_active_adapter`` and Y
  bound through I/O binding), limit 1e-3;
- ``precision``: fp16 and bf16 merged exports verified on the CUDA provider, error vs fp32;
- ``latency`` at batch 1 and 16: ONNX Runtime CUDA (base, merged, unmerged + Y run, unmerged
  + Y bound with inputs and outputs on the GPU) against PyTorch eager on the same GPU (merged
  and injected), medians of ``--repeat`` interleaved calls;
- ``train``: ``bench_gpu_train`` (bf16 step and memory: lorafx eager / training_graph /
  compiled vs PEFT eager / compiled vs full fine-tuning vs the frozen floor, on LLaMA 1.1B and
  GPT-2 medium; ``--train-model``, ``--no-compile``). On an H200 the compiled variants take
  1-2 minutes each to compile: run ``train`` alone, one model per run, to fit 10 minutes.

Without CUDA (``--device cuda`` on a machine without it) it prints ``no CUDA: the GPU path is
unverified`` and exits 0. ``--device cpu`` rehearses every section with the CPU standing in.
Prints JSON and Markdown tables; writes ``$OUT/gpu_check.json`` when ``OUT`` is set, else
``benchmarks/results/gpu_check.json``. Exit status 1 when a check or equality fails.
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
    export_onnx(lora_fx.capture(model, (ids,)), (ids,), tmp / "base.onnx")
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

    base = AdapterSession(ctx["tmp"] / "base.onnx", device)
    merged = AdapterSession(ctx["tmp"] / "merged.onnx", device)
    unmerged = AdapterSession(ctx["tmp"] / "unmerged.onnx", device)
    unmerged.load("y", ctx["tmp"] / "y.onnx_adapter")
    kind, index = unmerged.device
    gpu = torch.device("cuda") if kind == "cuda" and torch.cuda.is_available() else None
    if args.device == "cpu":  # the rehearsal: PyTorch on the CPU beside ONNX Runtime's CPU
        gpu = torch.device("cpu")
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
            "ort base": lambda f=feeds: base.run(f),
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
    if ids.is_cuda:
        torch.cuda.synchronize()


SECTIONS = ("checks", "equality", "precision", "latency", "train")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: rehearse every step with the CPU standing in for CUDA")
    p.add_argument("--rehearse", action="store_true", help="the same as --device cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats")
    p.add_argument("--only", action="append", choices=SECTIONS, help="run only this section")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--train-model", action="append", help="bench_gpu_train --model (repeatable)")
    p.add_argument("--no-compile", action="store_true", help="train: no torch.compile variants")
    args = p.parse_args(argv)
    if args.rehearse:
        args.device = "cpu"
    if args.quick:
        args.layers, args.d, args.rank, args.seq = 2, 64, 4, 16
        args.batches, args.repeat, args.warmup = [1, 4], 3, 1
    return args


def _train(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import bench_gpu_train

    argv = ["--device", args.device, "--json", str(out / "gpu_train.json")]
    argv += (["--quick", "--no-compile"] if args.quick else []) + \
        (["--no-compile"] if args.no_compile and not args.quick else [])
    for name in args.train_model or []:
        argv += ["--model", name]
    rc = bench_gpu_train.main(argv)
    data = json.loads((out / "gpu_train.json").read_text()) if rc == 0 else {}
    return {"returncode": rc, "rows": data.get("rows", [])}


def _sections(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import torch
    from gpu_portability import run_all

    device = torch.device(args.device)
    ort_cuda = args.device == "cuda" and cuda_ready()
    providers = cuda_providers() if ort_cuda else CPU
    only = args.only or list(SECTIONS)
    result: dict[str, Any] = {"device": "cuda" if args.device == "cuda" else "cpu (rehearsal)",
                              "onnxruntime": "CUDA" if ort_cuda else "CPU", "config": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        if "checks" in only:
            result["checks"] = run_all(device, providers, Path(tmp))
        if {"equality", "precision", "latency"} & set(only):
            if args.device == "cuda" and not ort_cuda:
                result["onnxruntime"] = "no usable CUDAExecutionProvider: ORT sections skipped"
            else:
                ctx = prepare(args, Path(tmp))
                if "equality" in only:
                    result["equality"] = equality(ctx, providers)
                if "precision" in only:
                    result["precision"] = precision(ctx, providers)
                if "latency" in only:
                    result["latency"] = latency(ctx, providers, args)
    if "train" in only:
        result["train"] = _train(args, out)
    return result


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    from gpu_portability import failures

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA: the GPU path is unverified (PyTorch finds no CUDA GPU on this machine)")
        return 0
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    result = _sections(args, out)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "train"}, indent=2, default=str))
    if result.get("latency"):
        print("\n| variant | batch x seq | median ms |\n| --- | --- | ---: |")
        for row in result["latency"]:
            if "median_ms" in row:
                print(f"| {row['variant']} | {row['batch']} x {row['seq']} | "
                      f"{row['median_ms']:.3f} |")
    bad = {k: v for k, v in result.get("equality", {}).items()
           if isinstance(v, float) and not v <= 1e-3}
    bad.update(failures(result.get("checks", {})))
    if result.get("train", {}).get("returncode"):
        bad["train"] = result["train"]["returncode"]
    if bad:
        print(f"FAILED: {json.dumps(bad, default=str)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
