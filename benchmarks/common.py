"""Shared benchmark machinery: clocks, interleaved repeats, statistics, peak memory, models.

Every figure is a median over repeated runs with its spread (min, quartiles, max). Cases that are
compared are run *interleaved* (A B C A B C ...), so a change in machine load hits all of them
alike, and each ratio is the median of the per-repeat ratios.

Clocks: ``cpu`` is this process's CPU time (all its threads); on a shared, loaded machine it
measures the work done, not the waiting. ``wall`` is the elapsed time; use it on a quiet machine.
Peak memory: the kernel's high-water mark of resident memory (``VmHWM``), reset before the
measured code runs (``/proc/self/clear_refs``), minus the resident memory at that moment.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CLOCK = os.environ.get("LORAFX_BENCH_CLOCK", "cpu")      # "cpu" or "wall"
THREADS = int(os.environ.get("LORAFX_BENCH_THREADS", "1"))


def setup_torch() -> None:
    """One intra-op thread by default: CPU time then measures work, not contention."""
    import warnings

    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(THREADS)
    import logging

    logging.disable(logging.WARNING)


def now() -> float:
    return time.process_time() if CLOCK == "cpu" else time.perf_counter()


def clock(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), seconds on the configured clock)."""
    start = now()
    out = fn()
    return out, now() - start


def stats(values: Sequence[float]) -> dict[str, float]:
    """median, quartiles, min, max and n of ``values``."""
    vals = sorted(values)
    if not vals:
        return {"n": 0}
    q = statistics.quantiles(vals, n=4, method="inclusive") if len(vals) > 1 else [vals[0]] * 3
    return {"median": statistics.median(vals), "q1": q[0], "q3": q[2], "min": vals[0],
            "max": vals[-1], "n": len(vals)}


def interleaved(cases: dict[str, Callable[[], Any]], reps: int, warmup: int = 1
                ) -> dict[str, list[float]]:
    """Run every case ``warmup`` times, then ``reps`` rounds of each case in turn."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            gc.collect()
            times[name].append(clock(fn)[1])
    return times


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Statistics of a[i] / b[i] over interleaved repeats (robust to load drift)."""
    return stats([x / y for x, y in zip(a, b, strict=True) if y > 0])


def _status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"{key}:\s+(\d+)", text)
    return int(match.group(1)) if match else 0


def peak_memory(fn: Callable[[], Any]) -> tuple[Any, float | None]:
    """(fn(), peak resident memory added while it ran, in MiB); None where unmeasurable."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kb("VmRSS")
    except OSError:
        return fn(), None
    out = fn()
    return out, max(0, _status_kb("VmHWM") - before) / 1024


def machine() -> dict[str, Any]:
    """What the figures were measured on, including how loaded the machine was."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "cpu": _cpu_name(), "cores": os.cpu_count(), "threads": THREADS, "clock": CLOCK,
        "torch": torch.__version__, "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    for mod in ("transformers", "peft", "onnx", "onnxruntime", "onnxscript"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing reference is reported, not fatal
            info[mod] = None
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                   / 2**30, 1)
    except (ValueError, OSError):
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@dataclass
class Row:
    """One comparison: ``case`` against ``baseline``; ratio = case / baseline (lower is better)."""

    suite: str
    model: str
    case: str
    baseline: str
    metric: str                      # "cpu_s", "wall_s", "peak_mib", "bytes"
    value: dict[str, float]
    baseline_value: dict[str, float]
    ratio: dict[str, float]
    target: str | None = None        # e.g. "<= 0.95"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        if not self.target or "median" not in self.ratio:
            return None
        op, bound = self.target.split()
        r = self.ratio["median"]
        return r <= float(bound) if op == "<=" else r >= float(bound)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["met"] = self.met
        return d


def row(suite: str, model: str, case: str, baseline: str, a: Sequence[float],
        b: Sequence[float], metric: str | None = None, target: str | None = None,
        note: str = "", paired: bool = True, **extra: Any) -> Row:
    """A Row from two series of measurements (paired when interleaved)."""
    ratio = paired_ratio(a, b) if paired and len(a) == len(b) else (
        {"median": statistics.median(a) / statistics.median(b), "n": min(len(a), len(b))}
        if a and b and statistics.median(b) > 0 else {"n": 0})
    return Row(suite, model, case, baseline, metric or f"{CLOCK}_s", stats(a), stats(b), ratio,
               target, note, dict(extra))


def emit(rows: list[Row], path: str | None) -> None:
    """Write rows as JSON to ``path`` (the runner collects them), or print them."""
    data = json.dumps([r.to_json() for r in rows], indent=1)
    if path:
        Path(path).write_text(data)
    else:
        sys.stdout.write(data + "\n")
