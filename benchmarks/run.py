"""Run every lorafx benchmark and write a Markdown table and JSON (ratios first).

    python benchmarks/run.py                 # GPT-2 small, LLaMA-shaped, BERT base (long)
    python benchmarks/run.py --quick         # tiny models, few repeats: the CI smoke run
    python benchmarks/run.py --only train --compile --out /tmp/bench

Suites (each a script of its own, run in a fresh process): ``train`` (bench_train.py),
``export`` (bench_export.py), ``latency`` (bench_latency.py), ``generate``
(bench_generate.py); ``deploy`` runs the ONNX Runtime adapter-serving benchmark
(bench_deploy.py) and ``mixed`` the mixed-adapter batch benchmark (bench_mixed.py) when they
are present. Writes ``results.json`` (machine,
settings, every row with medians and spread) and ``results.md`` into ``--out``.
Benchmarks report; they never fail on speed (exit 1 only when a suite crashes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SUITES = {"train": "bench_train.py", "export": "bench_export.py",
          "latency": "bench_latency.py", "generate": "bench_generate.py"}
EXTRAS = {"deploy": "bench_deploy.py",   # other benchmarks of the repository, when present
          "mixed": "bench_mixed.py"}


def suite_command(name: str, args: argparse.Namespace, out: Path) -> list[str]:
    script = HERE / (SUITES.get(name) or EXTRAS[name])
    cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
    if name in EXTRAS:
        return cmd + ["--out", str(out / f"{name}.json")]
    cmd += ["--json", str(out / f"rows_{name}.json")]
    if args.reps:
        cmd += ["--reps", str(args.reps)]
    if name == "train" and args.compile:
        cmd.append("--compile")
    if args.quick and name in ("train", "export"):
        cmd += ["--model", "gpt2", "--no-memory"]
    return cmd


def run_suite(name: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Run one suite in a fresh process; its log goes to ``out/logs/<name>.log``."""
    env = dict(os.environ, LORAFX_BENCH_THREADS=str(args.threads), LORAFX_BENCH_CLOCK=args.clock,
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    log = out / "logs" / f"{name}.log"
    start = time.perf_counter()
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(suite_command(name, args, out), stdout=fh, stderr=subprocess.STDOUT,
                                env=env, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    info: dict[str, Any] = {"suite": name, "returncode": rc, "log": str(log),
                            "seconds": round(time.perf_counter() - start, 1)}
    rows_file = out / f"rows_{name}.json"
    if name in SUITES and rc == 0 and rows_file.exists():
        info["rows"] = json.loads(rows_file.read_text())
        rows_file.unlink()
    elif name in EXTRAS and (out / f"{name}.json").exists():
        info["result_file"] = str(out / f"{name}.json")
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, few repeats (CI)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="output directory")
    ap.add_argument("--only", action="append", choices=[*SUITES, *EXTRAS],
                    help="run only this suite (repeatable)")
    ap.add_argument("--compile", action="store_true",
                    help="train: add torch.compile variants (lorafx and PEFT)")
    ap.add_argument("--reps", type=int, default=None, help="repeats per figure")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (torch, ORT)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="cpu: process CPU time (robust on a shared machine); wall: elapsed")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds per suite")
    args = ap.parse_args(argv)
    import common
    import report

    args.out.mkdir(parents=True, exist_ok=True)
    extras = [] if args.quick else [n for n, f in EXTRAS.items() if (HERE / f).exists()]
    names = args.only or [*SUITES, *extras]
    os.environ.update(LORAFX_BENCH_THREADS=str(args.threads), LORAFX_BENCH_CLOCK=args.clock)
    start = time.time()
    load_before = [round(x, 2) for x in os.getloadavg()]
    suites: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for name in names:
        print(f"[run] {name} ...", file=sys.stderr, flush=True)
        suites.append(run_suite(name, args, args.out))
        rows.extend(suites[-1].pop("rows", []))
        print(f"[run] {name}: exit {suites[-1]['returncode']} in {suites[-1]['seconds']} s",
              file=sys.stderr, flush=True)
        result = {  # written after every suite: a crash or a timeout keeps what was measured
            "machine": {**common.machine(), "load_average_before": load_before},
            "settings": {"quick": args.quick, "threads": args.threads, "clock": args.clock,
                         "compile": args.compile, "reps": args.reps, "suites": names},
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)),
            "seconds": round(time.time() - start, 1), "rows": rows, "suites": suites,
        }
        (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "results.md").write_text(report.markdown(result))
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'}")
    return 0 if all(s["returncode"] == 0 for s in suites) else 1


if __name__ == "__main__":
    sys.exit(main())
