"""Mixed-adapter batches in ONNX Runtime: one batch over k adapters vs k runs vs merged.

    python benchmarks/bench_mixed.py              # GPT-2-shaped 4 x 256, batch 16 x seq 64
    python benchmarks/bench_mixed.py --quick      # 2 x 64, seq 16, few repeats (a smoke run)
    python benchmarks/bench_mixed.py --model llama --seq 16

A random GPT-2-shaped model (vocab 1000: a small head, so the LoRA work weighs more than in a
real GPT-2), LoRA on c_attn, c_proj and c_fc (``--model llama``: a LLaMA-shaped model, LoRA on
q, v, o, up, down), 16 random adapters of ranks r and r/2 (so the
stacks are zero-padded). For k = 1, 4, 16 at batch 16, the same tokens run as

- ``mixed k``: one ``lorafx export --mixed-batch`` file holding the k adapters, one run of 16
  rows, row i on adapter 1 + (i mod k) (``AdapterSession.run(rows=...)``);
- ``split k``: the unmerged export (one session) run k times, once per adapter
  (``RunOptions.add_active_adapter``), each on its 16/k rows: what a server does without
  mixed batches;
- ``merged``: one adapter folded into the weights, one run of 16 rows: the floor.

Targets: mixed / split <= 1 for k >= 4, mixed / merged <= 1.3. Before timing, every mixed
row is checked against its adapter's split run (max |Δ| <= 1e-4).

``form`` rows compare, on one GPT-2-small-sized site (768 → 2304, r 8, 16 adapters, batch 16),
the ONNX forms a mixed branch can take, each as y = x W + Δ over the plain x W: ``gather``
(Gather the rows' A, B; batched MatMul: what lorafx emits), ``dense`` (x times all adapters'
A side by side, a one-hot mask per row, times all B) and ``einsum`` (Gather, then Einsum), at
seq 64 (prefill) and seq 1 (decode); ``unmerged`` (one adapter for every row, MatMul → MatMul
→ Add, as ``--no-merge`` exports) for reference.

Times: the configured clock (``LORAFX_BENCH_CLOCK``, process CPU time by default) over
interleaved repeats, ``LORAFX_BENCH_THREADS`` intra-op threads (default 1).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import models  # noqa: E402

TARGETS = {"gpt2": ("c_attn", "c_proj", "c_fc"),
           "llama": ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")}
KS = (1, 4, 16)
BATCH = 16


def spec(kind: str, quick: bool) -> models.Spec:
    layers, hidden = (2, 64) if quick else (4, 256)
    return models.Spec(f"{kind}-{layers}x{hidden}", kind, TARGETS[kind], 1000, 4, hidden, layers)


def adapters(base: Any, tokens: Any, targets: tuple[str, ...], rank: int, count: int,
             out: Path) -> list[Path]:
    """``count`` adapter dirs with random A, B (B ≠ 0), ranks alternating ``rank``, rank/2."""
    import torch

    import lora_fx

    dirs = []
    gen = torch.Generator().manual_seed(0)
    for r in (rank, max(1, rank // 2)):
        gm = lora_fx.inject(base, (tokens,), lora_fx.LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=list(targets)))
        for i in range(0 if r == rank else 1, count, 2):
            with torch.no_grad():
                for branch in lora_fx.branches(gm).values():
                    for w in (branch.lora_A.weight, branch.lora_B.weight):
                        w.copy_(torch.randn(w.shape, generator=gen) * 0.05)
            dirs.append((i, lora_fx.save_adapter(gm, out / f"ad{i}")))
    return [d for _, d in sorted(dirs)]


def export_files(s: models.Spec, rank: int, out: Path) -> dict[str, Any]:
    """merged.onnx (adapter 0), unmerged.onnx + one .onnx_adapter per adapter, mixed_k.onnx."""
    import lora_fx
    from lora_fx.ort.adapters import convert_adapter

    base = models.build(s)
    tokens = models.ids(s, 2, 16)
    dirs = adapters(base, tokens, s.targets, rank, max(KS), out)
    gm = lora_fx.load_adapter(base, (tokens,), dirs[0])
    lora_fx.export_onnx(gm, (tokens,), out / "merged.onnx", merge=True, verify=False)
    lora_fx.export_onnx(gm, (tokens,), out / "unmerged.onnx", merge=False, verify=False)
    files: dict[str, Any] = {"merged": out / "merged.onnx", "unmerged": out / "unmerged.onnx",
                             "adapters": [], "mixed": {}}
    for i, d in enumerate(dirs):
        files["adapters"].append(convert_adapter(d, out / f"ad{i}.onnx_adapter",
                                                 model=out / "unmerged.onnx").path)
    for k in KS:
        files["mixed"][k] = out / f"mixed_{k}.onnx"
        lora_fx.export_mixed(base, (tokens,), {f"ad{i}": dirs[i] for i in range(k)},
                             files["mixed"][k], verify=False)
    return files


def model_cases(files: dict[str, Any], seq: int, vocab: int
                ) -> dict[int, dict[str, Callable[[], Any]]]:
    """Per k: {"mixed", "split", "merged"} calls on the same tokens, checked equal first."""
    import numpy as np

    from lora_fx.ort.serving import AdapterSession

    providers, threads = ["CPUExecutionProvider"], common.THREADS
    merged = AdapterSession(files["merged"], providers, threads)
    unmerged = AdapterSession(files["unmerged"], providers, threads)
    for i, path in enumerate(files["adapters"]):
        unmerged.load(f"ad{i}", path)
    x = np.random.default_rng(0).integers(1, vocab, (BATCH, seq)).astype(np.int64)
    out: dict[int, dict[str, Callable[[], Any]]] = {}
    for k in KS:
        mixed = AdapterSession(files["mixed"][k], providers, threads)
        rows = [f"ad{i % k}" for i in range(BATCH)]
        parts = [(f"ad{j}", x[[i for i in range(BATCH) if i % k == j]]) for j in range(k)]
        (got,) = mixed.run({"input_ids": x}, rows=rows)
        for j, (name, part) in enumerate(parts):
            (want,) = unmerged.run({"input_ids": part}, name)
            err = float(np.abs(got[j::k] - want).max())
            assert err <= 1e-4, f"mixed k={k} row set {j} differs from its split run by {err}"
        out[k] = {
            "mixed": lambda m=mixed, r=rows: m.run({"input_ids": x}, rows=r),
            "split": lambda p=parts: [unmerged.run({"input_ids": xs}, n) for n, xs in p],
            "merged": lambda: merged.run({"input_ids": x}),
        }
    return out


def form_sessions(seq: int, n: int = 16, d: int = 768, o: int = 2304, r: int = 8
                  ) -> dict[str, Callable[[], Any]]:
    """One site's candidate ONNX forms (see the module docstring), checked equal first."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((d, o), dtype=np.float32) * 0.02
    a = rng.standard_normal((n + 1, d, r), dtype=np.float32) * 0.02
    b = rng.standard_normal((n + 1, r, o), dtype=np.float32) * 0.02
    a[0] = b[0] = 0
    mask = np.repeat(np.eye(n + 1, dtype=np.float32), r, axis=1)[:, None, :]
    inits = {"W": w, "A": a, "B": b, "Aall": a.transpose(1, 0, 2).reshape(d, -1),
             "Ball": b.reshape(-1, o), "M": mask, "A1": a[1], "B1": b[1]}
    node = helper.make_node
    delta = {
        "merged": [node("Identity", ["y0"], ["y"])],
        "unmerged": [node("MatMul", ["x", "A1"], ["h"]), node("MatMul", ["h", "B1"], ["dl"]),
                     node("Add", ["y0", "dl"], ["y"])],
        "gather": [node("Gather", ["A", "ids"], ["ga"], axis=0), node("MatMul", ["x", "ga"], ["h"]),
                   node("Gather", ["B", "ids"], ["gb"], axis=0),
                   node("MatMul", ["h", "gb"], ["dl"]), node("Add", ["y0", "dl"], ["y"])],
        "dense": [node("MatMul", ["x", "Aall"], ["h"]), node("Gather", ["M", "ids"], ["m"], axis=0),
                  node("Mul", ["h", "m"], ["hm"]), node("MatMul", ["hm", "Ball"], ["dl"]),
                  node("Add", ["y0", "dl"], ["y"])],
        "einsum": [node("Gather", ["A", "ids"], ["ga"], axis=0),
                   node("Einsum", ["x", "ga"], ["h"], equation="bsi,bir->bsr"),
                   node("Gather", ["B", "ids"], ["gb"], axis=0),
                   node("Einsum", ["h", "gb"], ["dl"], equation="bsr,bro->bso"),
                   node("Add", ["y0", "dl"], ["y"])],
    }
    x = rng.standard_normal((BATCH, seq, d), dtype=np.float32)
    feeds = {"x": x, "ids": (np.arange(BATCH) % n + 1).astype(np.int64)}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = common.THREADS, 3
    calls, results = {}, {}
    for form, nodes in delta.items():
        used = {i for nd in nodes for i in nd.input} | {"W"}
        graph = helper.make_graph(
            [node("MatMul", ["x", "W"], ["y0"]), *nodes], form,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", d]),
             helper.make_tensor_value_info("ids", TensorProto.INT64, ["b"])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(v, k) for k, v in inits.items() if k in used])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 9
        sess = ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        results[form] = sess.run(None, feeds)[0]
        calls[form] = lambda s_=sess: s_.run(None, feeds)
    for form in ("dense", "einsum"):
        assert float(np.abs(results[form] - results["gather"]).max()) <= 1e-4, form
    return calls


def loop(fn: Callable[[], Any], n: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(n):
            fn()
    return run


def run(quick: bool, reps: int, seq: int | None = None, kind: str = "gpt2"
        ) -> list[common.Row]:
    s = spec(kind, quick)
    rank = 8 if quick else 16
    seq = seq or (16 if quick else 64)
    rows: list[common.Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = model_cases(export_files(s, rank, Path(tmp)), seq, s.vocab)
        n = 2 if quick else 3
        for k, calls in cases.items():
            t = common.interleaved({name: loop(fn, n) for name, fn in calls.items()}, reps)
            note = f"batch {BATCH} x seq {seq}, {k} adapters (ranks {rank}/{rank // 2})"
            rows.append(common.row("mixed batch", s.name, f"mixed k={k}", f"split k={k}",
                                   t["mixed"], t["split"], target="<= 1.0" if k >= 4 else None,
                                   note=note))
            rows.append(common.row("mixed batch", s.name, f"mixed k={k}", "merged", t["mixed"],
                                   t["merged"], target="<= 1.3", note=note))
    for form_seq in ((16, 1) if quick else (64, 1)):
        calls = form_sessions(form_seq)
        t = common.interleaved({name: loop(fn, 5) for name, fn in calls.items()}, reps)
        for form in ("gather", "dense", "einsum", "unmerged"):
            rows.append(common.row("mixed form", "site 768x2304", form, "merged", t[form],
                                   t["merged"], note=f"batch {BATCH} x seq {form_seq}, r 8, "
                                   "16 adapters"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few repeats (CI smoke)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default 64, "
                                                             "quick 16)")
    ap.add_argument("--model", choices=list(TARGETS), default="gpt2")
    ap.add_argument("--json", "--out", dest="json", help="write rows here")
    args = ap.parse_args()
    common.setup_torch()
    common.emit(run(args.quick, args.reps or (2 if args.quick else 9), args.seq, args.model),
                args.json)


if __name__ == "__main__":
    main()
