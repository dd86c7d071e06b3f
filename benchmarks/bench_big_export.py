"""Merged ONNX export of a GPT-2-shaped model past 2 GB: peak memory as a multiple of its weights.

    python benchmarks/bench_big_export.py                      # 40 layers, d 1024: 2.2 GB fp32
    python benchmarks/bench_big_export.py --layers 4 --d 256   # a quick smoke run (not > 2 GB)

Each variant runs in its own process (peak RSS is per process), on the same random model:

- ``peft``: PEFT ``get_peft_model`` + ``merge_and_unload`` + ``torch.onnx.export(dynamo=True,
  external_data=True)``; no verification (the issue's reference figure: 1.29x).
- ``peft-verify``: the same, then what a user does to check the file: the merged model is
  deleted and ONNX Runtime (default session) runs the file once.
- ``peft-dynamic``: ``peft`` with batch and sequence axes dynamic (``Dim.AUTO``), the file
  lorafx writes: the like-for-like reference (symbolic shapes cost the exporter memory).
- ``lorafx``: ``lora_fx.inject`` + ``merge`` (copy-on-write) + ``export_onnx(verify=True)``,
  the default path: the model and ONNX Runtime's session are alive together while verifying.
- ``lorafx-lowmem``: exactly what ``lorafx export --merge`` calls, ``export_onnx(gm,
  merge=True, release=True, model=model)``: the branches are folded into the existing tensors,
  the program captured at inject time is exported, PyTorch's outputs are kept, the weights
  freed, then ONNX Runtime verifies (a lean session: no weight prepacking): at no point are two
  copies of the weights alive. ``lorafx-lowmem-noverify``: the same without verification (the
  work ``peft`` does).

Prints one JSON object: per variant the peak RSS and its multiple of the weights' bytes, the
peak after the model is built (``pipeline_peak_x_weights``: what inject/merge/export/verify
add; building a random HF model has a transient peak of its own), the RSS of the built model
with every library imported (``built_x_weights``: the floor), and each phase's peak and RSS.
Needs several GB of RAM, ~3x the weights on disk and minutes: not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = ("peft", "peft-verify", "peft-dynamic", "lorafx", "lorafx-lowmem",
            "lorafx-lowmem-noverify")


class Phases:
    """Peak RSS during each phase and RSS at its end (bytes), from /proc/self/status.

    The kernel's high-water mark is reset after each phase (``clear_refs`` 5), so each phase's
    peak is its own: the build's transient peak does not hide the pipeline's.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self._reset()

    @staticmethod
    def _status() -> tuple[int, int]:
        text = Path("/proc/self/status").read_text()
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        return (int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024)

    @staticmethod
    def _reset() -> None:
        Path("/proc/self/clear_refs").write_text("5")

    def mark(self, name: str) -> None:
        rss, peak = self._status()
        self.rows.append({"phase": name, "rss": rss, "peak": peak,
                          "t": round(time.perf_counter() - self.start, 1)})
        self._reset()


def build(layers: int, d: int) -> Any:
    """A random GPT-2 (tied head) with ``layers`` blocks of width ``d``; no download."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=d, n_head=max(1, d // 64), use_cache=False)
    return GPT2LMHeadModel(cfg).eval()


def weight_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def randomize(branches: list[tuple[Any, Any]]) -> None:
    """Random A and B (B = 0 would make the merge a no-op)."""
    import torch

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a, b in branches:
            for w in (a, b):
                w.copy_(torch.randn(w.shape, generator=g) * 0.02)


def run_peft(args: argparse.Namespace, ph: Phases, ids: Any, path: Path) -> dict[str, Any]:
    import peft
    import torch

    model = build(args.layers, args.d)
    ph.mark("built")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, target_modules=["c_attn"],
                                                    fan_in_fan_out=True))
    randomize([(m.lora_A["default"].weight, m.lora_B["default"].weight)
               for m in pm.modules() if hasattr(m, "lora_A") and "default" in m.lora_A])
    ph.mark("injected")
    merged = pm.merge_and_unload().eval()
    ph.mark("merged")
    auto = torch.export.Dim.AUTO
    dynamic = {"dynamic_shapes": ({0: auto, 1: auto},)} if args.child == "peft-dynamic" else {}
    torch.onnx.export(merged, (ids,), str(path), dynamo=True, external_data=True, **dynamic)
    ph.mark("exported")
    weights = weight_bytes(merged)
    if args.child == "peft-verify":
        import gc

        import onnxruntime as ort

        del merged, pm, model
        gc.collect()
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})
        ph.mark("verified")
    return {"weights": weights}


def run_lorafx(args: argparse.Namespace, ph: Phases, ids: Any, path: Path,
               lowmem: bool) -> dict[str, Any]:
    import lora_fx
    from lora_fx.api import export_onnx

    model = build(args.layers, args.d)
    weights = weight_bytes(model)
    ph.mark("built")
    gm = lora_fx.inject(model, (ids,), lora_fx.LoraConfig(r=args.rank,
                                                          target_modules=["c_attn"]))
    randomize([(b.lora_A.weight, b.lora_B.weight) for b in lora_fx.branches(gm).values()])
    ph.mark("injected")
    if not lowmem:
        merged = lora_fx.merge(gm)
        ph.mark("merged")
        report = export_onnx(merged, (ids,), path, merge=False, verify=True)
        ph.mark("exported+verified")
        return {"weights": weights, "max_abs_diff": report.max_abs_diff,
                "external_data": report.external_data}
    verify = args.child != "lorafx-lowmem-noverify"
    report = export_onnx(gm, (ids,), path, merge=True, verify=verify, release=True, model=model)
    ph.mark("merged+exported+released+verified")
    return {"weights": weights, "max_abs_diff": report.max_abs_diff,
            "external_data": report.external_data}


def child(args: argparse.Namespace) -> None:
    import torch

    ph = Phases()
    ph.mark("import torch")
    ids = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = Path(tmp) / "model.onnx"
        if args.child.startswith("peft"):
            info = run_peft(args, ph, ids, path)
        else:
            info = run_lorafx(args, ph, ids, path, lowmem=args.child.startswith("lorafx-lowmem"))
        info["onnx_bytes"] = sum(f.stat().st_size for f in Path(tmp).iterdir())
    peak = max(r["peak"] for r in ph.rows)
    after_build = max(r["peak"] for r in ph.rows[2:])
    built = ph.rows[1]["rss"]  # the model alone, with every library imported
    info.update(variant=args.child, peak_rss=peak, built_rss=built,
                peak_x_weights=round(peak / info["weights"], 3),
                pipeline_peak_x_weights=round(after_build / info["weights"], 3),
                built_x_weights=round(built / info["weights"], 3), phases=ph.rows)
    print(json.dumps(info))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--tmp", default=None, help="Where the ONNX files go (~3x weights).")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    results = []
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--child", variant, "--layers", str(args.layers),
               "--d", str(args.d), "--rank", str(args.rank)] + \
              (["--tmp", args.tmp] if args.tmp else [])
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        if proc.returncode != 0:
            results.append({"variant": variant, "error": proc.stderr[-2000:]})
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{variant}: peak {r['peak_rss'] / 2**30:.2f} GiB = {r['peak_x_weights']}x "
              f"weights; after the build {r['pipeline_peak_x_weights']}x (model alone "
              f"{r['built_x_weights']}x)", file=sys.stderr)
    print(json.dumps({"layers": args.layers, "d": args.d, "results": results}, indent=2))


if __name__ == "__main__":
    main()
