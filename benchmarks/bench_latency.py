"""Inference latency at batch 1 and a larger batch, ONNX Runtime vs PyTorch eager.

Cases (each with the same LoRA, A and B random and non-zero):

- ``ort merged``: ``lora_fx.export_onnx(merge=True)`` in ONNX Runtime;
- ``ort base``: the base model's export (no LoRA) in ONNX Runtime: merged must cost the same;
- ``ort merged+fused``: the merged file after ``lora_fx.ort.optimize.optimize_onnx``
  (ONNX Runtime's transformer fusions), checked equal to the plain file;
- ``ort unmerged``: ``export_onnx(merge=False)``, branches kept in the graph;
- ``eager merged``: lorafx's merged GraphModule; ``eager peft``: PEFT's unmerged model;
- ``fp32 GEMM peak``: the forward's FLOPs (torch's FLOP counter) as square 1024² ``torch.mm``
  calls, timed beside the cases and scaled to exactly those FLOPs: the time of a forward that
  ran every FLOP at the rate torch's BLAS reaches on a large square product (ONNX Runtime's
  MLAS reached ~7% more on GPT-2's LM head shape here, so it is a near peak, not a hard one).
  ``ort merged / fp32 GEMM peak`` near 1 means no graph optimization can make the file much
  faster; the ratio of the two ``/ peak`` rows bounds what ONNX Runtime can gain over eager.

The target row (ONNX Runtime at least 2x eager at batch 1) is the plain merged file, the one
``lorafx export`` writes; the fused file is reported beside it.

Every ONNX file is checked against PEFT's eager output before it is timed. Times are per
forward pass, the median over interleaved repeats of a loop of calls.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_export  # noqa: E402
import common  # noqa: E402
import models  # noqa: E402


def _session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = common.THREADS
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def build_files(base: Any, gm: Any, tokens: Any, s: models.Spec, out: Path,
                unmerged: bool) -> dict[str, Path]:
    """Export base, merged (and unmerged) files and the fused merged file."""
    import lora_fx
    from lora_fx.ort.optimize import optimize_onnx

    files = {"ort base": out / "base.onnx", "ort merged": out / "merged.onnx"}
    lora_fx.export_onnx(base, (tokens,), files["ort base"], verify=False,
                        dynamic_shapes=bench_export.dynamic_axes())
    lora_fx.export_onnx(gm, (tokens,), files["ort merged"], merge=True, verify=False)
    files["ort merged+fused"] = out / "merged_fused.onnx"
    optimize_onnx(files["ort merged"], files["ort merged+fused"], "bert", s.heads, s.hidden,
                  inputs=(tokens,))
    if unmerged:
        files["ort unmerged"] = out / "unmerged.onnx"
        lora_fx.export_onnx(gm, (tokens,), files["ort unmerged"], merge=False, verify=False)
    return files


def forward_cases(base: Any, gm: Any, pm: Any, files: dict[str, Path], tokens: Any
                  ) -> dict[str, Callable[[], Any]]:
    import torch

    import lora_fx

    merged = lora_fx.merge(gm).eval()
    cases: dict[str, Callable[[], Any]] = {}
    for name, path in files.items():
        sess = _session(path)
        feed = {sess.get_inputs()[0].name: tokens.numpy()}
        cases[name] = (lambda sess=sess, feed=feed: sess.run(None, feed))

    def eager(model: Any) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad():
                return model(tokens)
        return call

    cases["eager merged"] = eager(merged)
    cases["eager peft"] = eager(pm)
    cases["eager base"] = eager(base)
    return cases


def check(cases: dict[str, Callable[[], Any]], files: dict[str, Path]) -> dict[str, float]:
    """max |ORT − eager reference| per file on the timed input: PEFT's unmerged model for the
    LoRA files, the base model for the base file."""
    import numpy as np

    ref = {name: models.logits(cases[name]()).numpy() for name in ("eager peft", "eager base")}
    return {name: float(np.abs(cases[name]()[0] - ref["eager base" if name == "ort base"
                                                      else "eager peft"]).max())
            for name in files}


PEAK = "fp32 GEMM peak"
PEAK_SIZE = 1024  # a square torch.mm this size runs near the machine's fp32 GEMM peak


def forward_flops(call: Callable[[], Any]) -> float:
    """FLOPs of one forward (matrix products and attention, as torch's FLOP counter counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        call()
    return float(counter.get_total_flops())


def gemm_at_peak(flops: float) -> tuple[Callable[[], Any], float]:
    """(square fp32 GEMMs of about ``flops`` FLOPs, the factor that makes their time exactly
    ``flops``'s): the time this forward's FLOPs take at the rate the BLAS reaches on large
    matrices, timed beside the cases."""
    import torch

    a, b = torch.randn(PEAK_SIZE, PEAK_SIZE), torch.randn(PEAK_SIZE, PEAK_SIZE)
    reps = max(1, round(flops / (2 * PEAK_SIZE ** 3)))

    def run() -> None:
        for _ in range(reps):
            torch.mm(a, b)
    return run, flops / (reps * 2 * PEAK_SIZE ** 3)


def loop(fn: Callable[[], Any], n: int) -> Callable[[], Any]:
    def run() -> None:
        for _ in range(n):
            fn()
    return run


def run(quick: bool, kinds: list[str], reps: int, shapes: list[tuple[int, int]]
        ) -> list[common.Row]:
    """Every (batch, seq) shape on each model's files (exported once, axes dynamic)."""
    rows: list[common.Row] = []
    for kind in kinds:
        s = models.spec(kind, quick)
        base = models.build(s)
        tokens0 = models.ids(s, 2, 16)
        gm = bench_export.injected(base, tokens0, s)
        pm = bench_export.peft_like(base, gm, s)
        with tempfile.TemporaryDirectory() as tmp:
            files = build_files(base, gm, tokens0, s, Path(tmp), unmerged=not quick)
            for batch, seq in shapes:
                tokens = models.ids(s, batch, seq, seed=batch)
                cases = forward_cases(base, gm, pm, files, tokens)
                diffs = check(cases, files)
                flops = forward_flops(cases["eager merged"])
                cases[PEAK], scale = gemm_at_peak(flops)
                n = 2 if quick else max(1, 8 // batch)
                t = common.interleaved({k: loop(f, n) for k, f in cases.items()}, reps)
                t = {k: [x / n * (scale if k == PEAK else 1) for x in v] for k, v in t.items()}
                rows.extend(_rows(s, batch, seq, t, diffs, flops))
    return rows


def _rows(s: models.Spec, batch: int, seq: int, t: dict[str, list[float]],
          diffs: dict[str, float], flops: float) -> list[common.Row]:
    shape = f"batch {batch} x seq {seq}"
    out = []
    for case, base_name, target in (
            ("ort merged", "ort base", "<= 1.05"),
            ("ort merged", "eager merged", "<= 0.5" if batch == 1 else None),
            ("ort merged+fused", "eager merged", None),
            ("ort merged+fused", "ort merged", None),
            ("ort unmerged", "ort merged", None),
            ("ort merged", "eager peft", None),
            ("eager merged", "eager peft", None),
            ("eager merged", "eager base", None)):
        if case in t and base_name in t:
            out.append(common.row("latency", s.name, case, base_name, t[case], t[base_name],
                                  target=target, note=shape, max_abs_diff=diffs))
    for case in ("ort merged", "eager merged"):  # how far from the fastest possible forward
        out.append(common.row("latency vs GEMM peak", s.name, case, PEAK, t[case], t[PEAK],
                              note=f"{shape}; {flops / 1e9:.2f} GFLOP at the rate of a "
                              f"{PEAK_SIZE}x{PEAK_SIZE} torch.mm", gflop=flops / 1e9))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", action="append", choices=["gpt2", "bert", "llama"])
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--shape", action="append", metavar="BATCHxSEQ",
                    help="input shape, repeatable (default: 1x16, 1x64, 8x64; quick: 1x16)")
    ap.add_argument("--json", help="write rows here")
    args = ap.parse_args()
    common.setup_torch()
    kinds = args.model or (["gpt2"] if args.quick else ["gpt2", "bert"])
    reps = args.reps or (2 if args.quick else 7)
    shapes = [tuple(int(v) for v in x.lower().split("x")) for x in args.shape or
              (["1x16"] if args.quick else ["1x16", "1x64", "8x64"])]
    common.emit(run(args.quick, kinds, reps, shapes), args.json)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
