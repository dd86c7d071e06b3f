"""Render benchmark results (results.json) as Markdown: targets first, then every row.

A ratio is case / baseline on the row's metric (lower is better); its spread is the
interquartile range of the per-repeat ratios (min-max with fewer than 4 repeats). A figure is
marked *noisy* when that spread is wider than 10% of the median.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

NOISY = 0.10


def fmt_value(v: dict[str, float], metric: str) -> str:
    if "median" not in v:
        return "-"
    m = v["median"]
    if metric == "bytes":
        return f"{m / 2**20:.2f} MiB" if m >= 2**20 else f"{m / 1024:.1f} KiB"
    if metric == "peak_mib":
        return f"{m:.0f} MiB"
    unit = "s" if m >= 1 else "ms"
    shown = m if m >= 1 else m * 1000
    spread = ""
    if v.get("n", 0) > 1:
        lo, hi = (v["min"], v["max"]) if m >= 1 else (v["min"] * 1000, v["max"] * 1000)
        spread = f" ({lo:.3g}-{hi:.3g})"
    return f"{shown:.3g} {unit}{spread}"


def fmt_ratio(r: dict[str, float]) -> tuple[str, bool]:
    if "median" not in r:
        return "-", False
    m = r["median"]
    if r.get("n", 0) >= 4:
        lo, hi = r["q1"], r["q3"]
    elif r.get("n", 0) > 1:
        lo, hi = r["min"], r["max"]
    else:
        return f"{m:.3f}", False
    noisy = (hi - lo) > NOISY * m
    return f"{m:.3f} [{lo:.3f}-{hi:.3f}]", noisy


def _met(row: dict[str, Any]) -> str:
    return {True: "yes", False: "**no**", None: ""}[row.get("met")]


def targets_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| target | model | setting | case / baseline | ratio (median [spread]) | met |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if not r.get("target"):
            continue
        ratio, noisy = fmt_ratio(r["ratio"])
        lines.append(f"| {r['suite']}: ratio {r['target']} | {r['model']} | {r.get('note', '')} "
                     f"| {r['case']} / {r['baseline']} | {ratio}{' noisy' if noisy else ''} | "
                     f"{_met(r)} |")
    return lines


def rows_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| suite | model | case | baseline | ratio [spread] | case | baseline | n | "
             "setting |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio, noisy = fmt_ratio(r["ratio"])
        lines.append(
            f"| {r['suite']} | {r['model']} | {r['case']} | {r['baseline']} | "
            f"{ratio}{' noisy' if noisy else ''} | {fmt_value(r['value'], r['metric'])} | "
            f"{fmt_value(r['baseline_value'], r['metric'])} | {r['value'].get('n', '')} | "
            f"{r.get('note', '')} |")
    return lines


def machine_lines(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    s = result["settings"]
    clock = ("process CPU time (all threads)" if s["clock"] == "cpu" else "wall-clock time")
    return [f"- machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB; "
            f"{m.get('platform')}",
            f"- load average before / after: {m.get('load_average_before')} / "
            f"{m.get('load_average')} (a load above the core count means a shared machine)",
            f"- software: Python {m.get('python')}, torch {m.get('torch')}, transformers "
            f"{m.get('transformers')}, peft {m.get('peft')}, onnx {m.get('onnx')}, onnxscript "
            f"{m.get('onnxscript')}, onnxruntime {m.get('onnxruntime')}",
            f"- settings: {'quick' if s['quick'] else 'full'} run, {s['threads']} intra-op "
            f"thread(s), times are {clock}; started {result['started']}, took "
            f"{result['seconds']} s"]


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    out = ["# lorafx benchmarks", "", *machine_lines(result), "",
           "Ratios are case / baseline (lower is better), medians of per-repeat ratios of "
           "interleaved runs; [spread] is the interquartile range (min-max under 4 repeats).",
           "", "## Targets", "", *targets_table(rows), "", "## All figures", "",
           *rows_table(rows), ""]
    failed = [s for s in result["suites"] if s["returncode"] != 0]
    extras = [s for s in result["suites"] if s.get("result_file")]
    if extras:
        out += ["## Other benchmarks", ""]
        out += [f"- {s['suite']}: {s['result_file']}" for s in extras] + [""]
    if failed:
        out += ["## Failed suites", ""]
        out += [f"- {s['suite']}: exit {s['returncode']}, see {s['log']}" for s in failed]
        out += [""]
    return "\n".join(out)


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/results.json")
    sys.stdout.write(markdown(json.loads(path.read_text())))
