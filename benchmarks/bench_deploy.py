"""ONNX Runtime latency: base vs merged vs unmerged (one session, adapters swapped per call).

    python benchmarks/bench_deploy.py            # GPT-2-shaped, 4 layers, d 256, r 16
    python benchmarks/bench_deploy.py --quick    # smaller and fewer repeats (a smoke run)

One random GPT-2-shaped model (no download), LoRA on c_attn, c_proj and c_fc. Exports: the
base model, the merged model (W' = W + s·B@A) and the unmerged model (branches kept as
MatMul→MatMul→Add with A', B' as adapter inputs). Variants timed, each on its own session:

- ``base``, ``merged``: plain ``session.run``;
- ``unmerged/defaults``: no adapter active (the exported adapter's initializers);
- ``unmerged/adapter``: a second adapter of another rank active through
  ``RunOptions.add_active_adapter`` (ONNX Runtime feeds its parameters per call);
- ``unmerged/bound``: the same adapter bound by ``lora_fx.ort.serving`` through I/O binding.

Per variant and batch: the median of ``--repeat`` calls after warm-up (variants interleaved,
so load changes fall on all alike), with the 10th-90th percentile spread, and the ratio of
medians to ``base``. Prints a Markdown table, writes JSON to ``benchmarks/results/deploy.json``.
Wall-clock figures depend on the machine and its load: read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["c_attn", "c_proj", "c_fc"]


def build(layers: int, d: int, vocab: int, positions: int) -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=d, n_head=max(1, d // 64), vocab_size=vocab,
                     n_positions=positions, use_cache=False, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def random_adapter(model: Any, ids: Any, rank: int, seed: int) -> Any:
    """An injected model with random A and B (B ≠ 0), so the branch does real work."""
    import torch

    import lora_fx

    gm = lora_fx.inject(model, (ids,), lora_fx.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                          target_modules=TARGETS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for branch in lora_fx.branches(gm).values():
            for w in (branch.lora_A.weight, branch.lora_B.weight):
                w.copy_(torch.randn(w.shape, generator=gen) * 0.02)
    return gm.eval()


def export_all(args: argparse.Namespace, tmp: Path) -> dict[str, Path]:
    """base.onnx, merged.onnx, unmerged.onnx and other.onnx_adapter (rank 2·r) in ``tmp``."""
    import torch

    import lora_fx
    from lora_fx.api import export_onnx
    from lora_fx.ort.adapters import convert_adapter

    model = build(args.layers, args.d, args.vocab, args.positions)
    ids = torch.randint(1, args.vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    gm = random_adapter(model, ids, args.rank, seed=1)
    export_onnx(lora_fx.capture(model, (ids,)), (ids,), tmp / "base.onnx", verify=False)
    export_onnx(gm, (ids,), tmp / "merged.onnx", merge=True, verify=False)
    export_onnx(gm, (ids,), tmp / "unmerged.onnx", merge=False, verify=False)
    other = random_adapter(model, ids, 2 * args.rank, seed=2)
    lora_fx.save_adapter(other, tmp / "other")
    convert_adapter(tmp / "other", tmp / "other.onnx_adapter", model=tmp / "unmerged.onnx")
    return {"base": tmp / "base.onnx", "merged": tmp / "merged.onnx",
            "unmerged": tmp / "unmerged.onnx", "adapter": tmp / "other.onnx_adapter"}


def timed(calls: dict[str, Any], repeat: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, interleaved (one call of each in turn per repeat), so
    that a change of the machine's load falls on every variant alike."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeat):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times


def stats(times: list[float]) -> dict[str, float]:
    ms = sorted(t * 1e3 for t in times)
    q = statistics.quantiles(ms, n=10) if len(ms) > 1 else [ms[0]] * 9
    return {"median_ms": statistics.median(ms), "p10_ms": q[0], "p90_ms": q[-1]}


def measure(files: dict[str, Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    import numpy as np

    from lora_fx.ort.serving import AdapterSession

    sessions = {name: AdapterSession(files[name], ["CPUExecutionProvider"], args.threads)
                for name in ("base", "merged", "unmerged")}
    sessions["unmerged"].load("other", files["adapter"])
    variants = {
        "base": lambda f: sessions["base"].run(f),
        "merged": lambda f: sessions["merged"].run(f),
        "unmerged/defaults": lambda f: sessions["unmerged"].run(f),
        "unmerged/adapter": lambda f: sessions["unmerged"].run(f, "other"),
        "unmerged/bound": lambda f: sessions["unmerged"].run_bound(f, "other"),
    }
    rows = []
    rng = np.random.default_rng(0)
    for batch in args.batches:
        feeds = {"input_ids": rng.integers(1, args.vocab, (batch, args.seq)).astype(np.int64)}
        times = timed({name: (lambda fn=fn, f=feeds: fn(f)) for name, fn in variants.items()},
                      args.repeat, args.warmup)
        base = stats(times["base"])["median_ms"]
        for name, t in times.items():
            s = stats(t)
            rows.append({"variant": name, "batch": batch, "seq": args.seq, **s,
                         "x_base": s["median_ms"] / base})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | batch x seq | median ms | p10-p90 ms | x base |",
             "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['batch']} x {r['seq']} | {r['median_ms']:.3f} | "
                     f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f} | {r['x_base']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small model, few repeats")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "deploy.json")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.d, args.rank, args.seq = 2, 128, 8, 32
        args.batches, args.repeat, args.warmup = [1, 8], 10, 2
    args.vocab, args.positions = 1000, max(128, args.seq)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(export_all(args, Path(tmp)), args)
    result = {"config": {k: v for k, v in vars(args).items() if k != "out"},
              "machine": {"python": sys.version.split()[0], "onnxruntime": ort.__version__,
                          "cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "loadavg": os.getloadavg()},
              "rows": rows}
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
