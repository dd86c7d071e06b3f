"""Inject time, merge + ONNX export (time and peak memory), adapter size.

- inject: ``lora_fx.inject`` (capture + match + inject) vs ``peft.get_peft_model``;
- merge + export: ``lora_fx.export_onnx(gm, merge=True)`` (fold, export, save) vs PEFT's
  ``merge_and_unload()`` + ``torch.onnx.export(dynamo=True)`` + save, with the same dynamic
  batch and sequence axes (``peft-static``: PEFT's export with fixed shapes, the default call;
  ``peft-fixed``: PEFT's export with onnxscript's rules matched op type first, the fix lorafx's
  exports run with, so that the rest of lorafx's gain shows on its own);
  both files are checked against PEFT's unmerged eager output (max |diff| in the row);
- peak memory of merge + export, each in a fresh process;
- adapter size: ``adapter_model.safetensors`` against the model's parameter bytes.
"""

from __future__ import annotations

import argparse
import copy
import gc
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import models  # noqa: E402

R, ALPHA = 8, 16


def dynamic_axes() -> tuple[Any, ...]:
    """Batch and sequence axes of the token ids dynamic (what lorafx exports by default)."""
    import torch

    auto = torch.export.Dim.AUTO
    return ({0: auto, 1: auto},)


def lora_config(s: models.Spec) -> Any:
    import lora_fx

    return lora_fx.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(s.targets))


def peft_like(base: Any, gm: Any, s: models.Spec) -> Any:
    """PEFT's model on a copy of ``base`` carrying lorafx's A and B."""
    import peft
    import torch

    import lora_fx

    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=list(s.targets)))
    with torch.no_grad():
        for name, b in lora_fx.branches(gm).items():
            mod = pm.base_model.model.get_submodule(name)
            mod.lora_A["default"].weight.copy_(b.lora_A.weight)
            mod.lora_B["default"].weight.copy_(b.lora_B.weight)
    return pm.eval()


def injected(base: Any, tokens: Any, s: models.Spec) -> Any:
    """lorafx's model with random non-zero A and B."""
    import torch

    import lora_fx

    gm = lora_fx.inject(base, (tokens,), lora_config(s)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_fx.lora_parameters(gm):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return gm


def export_cases(base: Any, gm: Any, tokens: Any, s: models.Spec, out: Path
                 ) -> dict[str, Callable[[], Any]]:
    """name -> merge + export + save of a fresh copy, writing ``out/<name>.onnx``."""
    import torch

    import lora_fx

    def lorafx_case() -> Any:
        return lora_fx.export_onnx(gm, (tokens,), out / "lorafx.onnx", merge=True,
                                   verify=False)

    def peft_case(dynamic: bool, fixed: bool = False) -> Callable[[], Any]:
        """``fixed``: onnxscript's rules matched op type first, as in lorafx's exports."""
        from lora_fx.onnx.rules import op_type_first

        holder: dict[str, Any] = {}

        def prepare() -> None:
            holder["pm"] = peft_like(base, gm, s)

        def run() -> Any:
            merged = holder.pop("pm").merge_and_unload()
            kw = {"dynamic_shapes": dynamic_axes()} if dynamic else {}
            with op_type_first() if fixed else nullcontext():
                prog = torch.onnx.export(merged, (tokens,), dynamo=True, verbose=False, **kw)
            name = "peft" + ("" if dynamic else "-static") + ("-fixed" if fixed else "")
            prog.save(str(out / f"{name}.onnx"))
            return prog

        run.prepare = prepare  # type: ignore[attr-defined]
        return run

    return {"lorafx": lorafx_case, "peft": peft_case(True), "peft-static": peft_case(False),
            "peft-fixed": peft_case(True, fixed=True)}


def _collected(fn: Callable[[], Any]) -> None:
    fn()
    gc.collect()


def time_exports(cases: dict[str, Callable[[], Any]], reps: int, warm: bool = True
                 ) -> dict[str, list[float]]:
    """Interleaved; PEFT's model copy is made outside the clock (merge_and_unload mutates).

    With ``warm``, a first untimed round loads what every exporter loads once per process.
    Each timed case ends with a full ``gc.collect()`` on its clock: it pays for collecting its
    own garbage, which it would otherwise leave to the next case (lorafx's export runs with
    the collector frozen, which defers a full collection to after it).
    """
    times: dict[str, list[float]] = {k: [] for k in cases}
    for i in range(reps + int(warm)):
        for name, fn in cases.items():
            prep = getattr(fn, "prepare", None)
            if prep:
                prep()
            _, t = common.clock(partial(_collected, fn))
            if i or not warm:
                times[name].append(t)
    return times


def check_files(gm: Any, base: Any, tokens: Any, s: models.Spec, out: Path
                ) -> dict[str, float]:
    """max |ORT(file) − PEFT unmerged eager| on another batch/sequence shape."""
    import numpy as np
    import torch

    from lora_fx.ort import runtime

    probe = models.ids(s, 3, tokens.shape[1] + 3, seed=7)
    with torch.no_grad():
        want = models.logits(peft_like(base, gm, s)(probe)).numpy()
    diffs = {}
    for name in ("lorafx", "peft"):
        sess = runtime.open_session(out / f"{name}.onnx", ["CPUExecutionProvider"])
        diffs[name] = float(np.abs(runtime.run(sess, (probe,))[0] - want).max())
    return diffs


def inject_times(base: Any, tokens: Any, s: models.Spec, reps: int) -> dict[str, list[float]]:
    import peft

    import lora_fx

    times: dict[str, list[float]] = {"lorafx": [], "peft": []}
    lora_fx.inject(base, (tokens,), lora_config(s))      # warm-up: imports, first trace
    for _ in range(max(reps, 3)):
        times["lorafx"].append(common.clock(lambda: lora_fx.inject(
            base, (tokens,), lora_config(s)))[1])
        cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(s.targets))
        times["peft"].append(common.clock(partial(peft.get_peft_model, copy.deepcopy(base),
                                                  cfg))[1])
    return times


def adapter_sizes(gm: Any, base: Any, out: Path) -> tuple[int, int]:
    import lora_fx

    lora_fx.save_adapter(gm, out / "adapter", force=True)
    size = (out / "adapter" / "adapter_model.safetensors").stat().st_size
    return size, sum(p.numel() * p.element_size() for p in base.parameters())


def memory_of(kind: str, case: str, quick: bool) -> float | None:
    """Peak memory added by one merge + export + save, in a fresh process."""
    proc = subprocess.run([sys.executable, __file__, "--memory-child", case, "--model", kind]
                          + (["--quick"] if quick else []), capture_output=True, text=True,
                          timeout=3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEAK_MIB ")]
    value = lines[-1].split()[1] if lines else "None"
    return None if value == "None" else float(value)


def _memory_child(kind: str, case: str, quick: bool) -> None:
    s = models.spec(kind, quick)
    base = models.build(s)
    tokens = models.ids(s, 2, 16)
    gm = injected(base, tokens, s)
    with tempfile.TemporaryDirectory() as tmp:
        fn = export_cases(base, gm, tokens, s, Path(tmp))[case]
        prep = getattr(fn, "prepare", None)
        if prep:
            prep()
        _, peak = common.peak_memory(fn)
    print(f"PEAK_MIB {peak}")


def run(quick: bool, kinds: list[str], reps: int, memory: bool) -> list[common.Row]:
    rows: list[common.Row] = []
    for kind in kinds:
        s = models.spec(kind, quick)
        base = models.build(s)
        tokens = models.ids(s, 2, 16)
        inj = inject_times(base, tokens, s, reps)
        rows.append(common.row("inject", s.name, "lorafx inject", "peft get_peft_model",
                               inj["lorafx"], inj["peft"],
                               note="lorafx captures the graph (torch.export) first"))
        gm = injected(base, tokens, s)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            cases = export_cases(base, gm, tokens, s, out)
            if quick:
                del cases["peft-static"], cases["peft-fixed"]
            t = time_exports(cases, reps, warm=not quick)
            diffs = check_files(gm, base, tokens, s, out)
            size, model_bytes = adapter_sizes(gm, base, out)
        note = "merge + ONNX export + save; batch and sequence axes dynamic"
        rows.append(common.row("merge+export", s.name, "lorafx export_onnx(merge=True)",
                               "peft merge_and_unload + torch.onnx.export", t["lorafx"],
                               t["peft"], target="<= 0.8", note=note,
                               max_abs_diff_vs_peft_eager=diffs))
        if "peft-static" in t:
            rows.append(common.row("merge+export", s.name, "lorafx export_onnx(merge=True)",
                                   "peft ... torch.onnx.export (static shapes)", t["lorafx"],
                                   t["peft-static"], note="PEFT file has fixed shapes"))
        if "peft-fixed" in t:
            rows.append(common.row(
                "merge+export", s.name, "lorafx export_onnx(merge=True)",
                "peft ... torch.onnx.export (onnxscript matched op type first)", t["lorafx"],
                t["peft-fixed"], note="PEFT's export given lorafx's fix of onnxscript's "
                "matcher (lora_fx.onnx.rules): what lorafx's own path adds"))
        rows.append(common.row("adapter size", s.name, "adapter_model.safetensors",
                               "model parameters", [size], [model_bytes], metric="bytes",
                               note=f"r={R}, targets {','.join(s.targets)}"))
        if memory:
            mem = {c: memory_of(kind, c, quick) for c in ("lorafx", "peft")}
            if mem["lorafx"] is not None and mem["peft"] is not None:
                rows.append(common.row("merge+export memory", s.name, "lorafx", "peft",
                                       [mem["lorafx"]], [mem["peft"]], metric="peak_mib",
                                       target="<= 1.0", note="peak RSS added"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", action="append", choices=["gpt2", "llama"])
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", help="write rows here")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    common.setup_torch()
    kinds = args.model or ["gpt2", "llama"]
    if args.memory_child:
        _memory_child(kinds[0], args.memory_child, args.quick)
        return
    reps = args.reps or (1 if args.quick else 3)
    common.emit(run(args.quick, kinds, reps, not args.no_memory), args.json)


if __name__ == "__main__":
    main()
