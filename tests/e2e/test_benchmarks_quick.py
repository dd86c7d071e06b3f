"""CI smoke run of the benchmark suite: it completes and writes valid results. Never a speed
assertion: benchmarks report figures, they do not fail builds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def test_quick_benchmarks_write_json_and_markdown(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    logs = "\n".join(p.read_text()[-2000:] for p in (tmp_path / "logs").glob("*.log"))
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{logs}"
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["machine"]["cores"] and result["settings"]["quick"] is True
    suites = {r["suite"] for r in result["rows"]}
    assert {"train step", "merge+export", "latency", "latency vs GEMM peak", "inject",
            "adapter size", "generate"} <= suites
    for row in result["rows"]:
        assert row["ratio"]["median"] > 0 and row["value"]["n"] >= 1, row
    md = (tmp_path / "results.md").read_text()
    assert "## Targets" in md and "| target |" in md


def test_mixed_batch_benchmark_quick(tmp_path: Path) -> None:
    """bench_mixed.py --quick: mixed vs split vs merged for k = 1, 4, 16, and the site forms
    (its own check that mixed rows equal their adapters' split runs runs first)."""
    out = tmp_path / "mixed.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_mixed.py"),
                           "--quick", "--json", str(out)], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = json.loads(out.read_text())
    cases = {(r["suite"], r["case"], r["baseline"]) for r in rows}
    for k in (1, 4, 16):
        assert ("mixed batch", f"mixed k={k}", f"split k={k}") in cases
        assert ("mixed batch", f"mixed k={k}", "merged") in cases
    assert {("mixed form", f, "merged") for f in ("gather", "dense", "einsum")} <= cases
    assert all(r["ratio"]["median"] > 0 for r in rows)


def test_gpu_check_rehearses_on_the_cpu(tmp_path: Path) -> None:
    """The one prepared GPU script (benchmarks/gpu_check.py) with the CPU standing in for CUDA:
    every section runs (portability checks, ONNX Runtime equality, precision, latency, the bf16
    training benchmark) and writes its JSON; no check fails."""
    import os

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"),
                           "--device", "cpu", "--quick"], capture_output=True, text=True,
                          timeout=900, cwd=ROOT, env={**os.environ, "OUT": str(tmp_path)})
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {"checks", "equality", "precision", "latency", "train"} <= set(result)
    assert not any(isinstance(v, dict) and "error" in v for v in result["checks"].values())
    assert {r["variant"] for r in result["latency"] if "median_ms" in r} >= {
        "ort base", "ort merged", "ort unmerged + Y (bound)", "pytorch merged"}
    train = {(r["case"], r["baseline"]) for r in result["train"]["rows"]}
    assert ("lorafx-fast", "full") in train and ("lorafx-adapter", "lorafx") in train
