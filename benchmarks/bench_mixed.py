"""Mixed-adapter batches in ONNX Runtime: one batch over k adapters vs k runs vs merged.

    python benchmarks/bench_mixed.py              # GPT-2-shaped 4 x 256, batch 16 x seq 64
    python benchmarks/bench_mixed.py --quick      # 2 x 64, seq 16, few repeats (a smoke run)
    python benchmarks/bench_mixed.py --model llama --seq 16
    python benchmarks/bench_mixed.py --hidden 768 --layers 2 --seq 1   # GPT-2-small width, decode
    python benchmarks/bench_mixed.py --cuda       # ONNX Runtime's CUDA provider (wall clock)

A random GPT-2-shaped model (vocab 1000: a small head, so the LoRA work weighs more than in a
real GPT-2), LoRA on c_attn, c_proj and c_fc (``--model llama``: a LLaMA-shaped model, LoRA on
q, v, o, up, down), ``--hidden`` wide and ``--layers`` deep (default 4 x 256), 16 random
adapters of ranks r and r/2 (so the stacks are zero-padded; ``--equal-ranks``: all r). For
k = 1, 4, 16 at batch 16, the same tokens run as

- ``mixed k``: one ``lorafx export --mixed-batch`` file holding the k adapters, one run of 16
  rows, row i on adapter 1 + (i mod k) (``AdapterSession.run(rows=...)``);
- ``split k``: the unmerged export (one session) run k times, once per adapter
  (``RunOptions.add_active_adapter``), each on its 16/k rows: what a server does without
  mixed batches;
- ``merged``: one adapter folded into the weights, one run of 16 rows: the floor;
- ``merged in k runs``: the merged model over the same k row groups, one run each: what
  splitting the batch alone costs or saves on this machine, with no LoRA work at all.

Targets: mixed / split <= 1 for k >= 4, mixed / merged <= 1.3. Before timing, every mixed
row is checked against its adapter's split run (max |Δ| <= 1e-4).

``form`` rows compare, on one GPT-2-small-sized site (768 → 2304, r 8, 16 adapters, batch 16,
4 or 16 of them in the batch), the ONNX forms a mixed branch can take, each as y = x W + Δ
over the plain x W: ``gather`` (Gather the rows' A, B; batched MatMul: what lorafx emits),
``dense`` (x times all adapters' A side by side, a one-hot mask per row, times all B),
``einsum`` (Gather, then Einsum) and ``unique`` (Gather only the batch's distinct adapters,
``Unique(ids)``; x times each; the row's own block kept by a one-hot mask; one Gemm over the
blocks side by side, y0 as its C), at seq 64 (prefill) and seq 1 (decode); ``unmerged`` (one
adapter for every row, MatMul → MatMul → Add, as ``--no-merge`` exports) for reference.

Times: the configured clock (``LORAFX_BENCH_CLOCK``, process CPU time by default; use
``wall`` with ``--cuda``) over interleaved repeats, ``LORAFX_BENCH_THREADS`` intra-op threads
(default 1).
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


def spec(kind: str, quick: bool, hidden: int | None = None, layers: int | None = None
         ) -> models.Spec:
    hidden = hidden or (64 if quick else 256)
    layers = layers or (2 if quick else 4)
    heads = 4 if hidden < 512 else hidden // 64
    return models.Spec(f"{kind}-{layers}x{hidden}", kind, TARGETS[kind], 1000, heads, hidden,
                       layers)


def adapters(base: Any, tokens: Any, targets: tuple[str, ...], rank: int, count: int,
             out: Path, equal: bool = False) -> list[Path]:
    """``count`` adapter dirs with random A, B (B ≠ 0), ranks alternating ``rank``, rank/2
    (``equal``: all ``rank``)."""
    import torch

    import lora_fx

    dirs = []
    gen = torch.Generator().manual_seed(0)
    for first, r in enumerate((rank,) if equal else (rank, max(1, rank // 2))):
        gm = lora_fx.inject(base, (tokens,), lora_fx.LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=list(targets)))
        for i in range(first, count, 1 if equal else 2):
            with torch.no_grad():
                for branch in lora_fx.branches(gm).values():
                    for w in (branch.lora_A.weight, branch.lora_B.weight):
                        w.copy_(torch.randn(w.shape, generator=gen) * 0.05)
            dirs.append((i, lora_fx.save_adapter(gm, out / f"ad{i}")))
    return [d for _, d in sorted(dirs)]


def export_files(s: models.Spec, rank: int, out: Path, equal: bool = False) -> dict[str, Any]:
    """merged.onnx (adapter 0), unmerged.onnx + one .onnx_adapter per adapter, mixed_k.onnx."""
    import lora_fx
    from lora_fx.ort.adapters import convert_adapter

    base = models.build(s)
    tokens = models.ids(s, 2, 16)
    dirs = adapters(base, tokens, s.targets, rank, max(KS), out, equal)
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


def model_cases(files: dict[str, Any], seq: int, vocab: int, providers: list[str]
                ) -> dict[int, dict[str, Callable[[], Any]]]:
    """Per k: {"mixed", "split", "merged"} calls on the same tokens, checked equal first."""
    import numpy as np

    from lora_fx.ort.serving import AdapterSession

    threads = common.THREADS
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
            "merged split": lambda p=parts: [merged.run({"input_ids": xs}) for _, xs in p],
        }
    return out


def form_sessions(seq: int, distinct: int, providers: list[str], n: int = 16, d: int = 768,
                  o: int = 2304, r: int = 8) -> dict[str, Callable[[], Any]]:
    """One site's candidate ONNX forms (see the module docstring), checked equal first; row i
    on adapter 1 + (i mod ``distinct``)."""
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
             "Ball": b.reshape(-1, o), "M": mask, "A1": a[1], "B1": b[1],
             "rows": np.array([BATCH * seq, -1], np.int64), "outs": np.array([-1, o], np.int64),
             "ax1": np.array([1], np.int64), "ax2": np.array([2], np.int64),
             "bso": np.array([BATCH, seq, o], np.int64), "zero": np.array(0, np.int64),
             "one": np.array(1, np.int64)}
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
        "unique": _unique_nodes(),
    }
    x = rng.standard_normal((BATCH, seq, d), dtype=np.float32)
    feeds = {"x": x, "ids": (np.arange(BATCH) % distinct + 1).astype(np.int64)}
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
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
        results[form] = sess.run(None, feeds)[0]
        calls[form] = lambda s_=sess: s_.run(None, feeds)
    for form in ("dense", "einsum", "unique"):
        assert float(np.abs(results[form] - results["gather"]).max()) <= 1e-4, form
    return calls


def _unique_nodes() -> list[Any]:
    """The ``unique`` form: u = Unique(ids), x·A[u] for every token ([u, b, s, r]), the row's
    own block kept (one-hot of the row's index in u), blocks side by side ([b·s, u·r]), one
    Gemm with B[u] stacked ([u·r, out]) and y0 as its C."""
    from onnx import helper

    node = helper.make_node
    return [node("Unique", ["ids"], ["u", "first", "inv", "count"], sorted=1),
            node("Gather", ["A", "u"], ["au"], axis=0), node("Gather", ["B", "u"], ["bu"], axis=0),
            node("Unsqueeze", ["x", "ax1"], ["x1"]), node("Transpose", ["x1"], ["xu"],
                                                         perm=[1, 0, 2, 3]),
            node("Unsqueeze", ["au", "ax1"], ["au1"]), node("MatMul", ["xu", "au1"], ["hu"]),
            node("Shape", ["u"], ["nu"]), node("Squeeze", ["nu"], ["nu0"]),
            node("Range", ["zero", "nu0", "one"], ["ru"]),
            node("Unsqueeze", ["inv", "ax1"], ["inv1"]), node("Equal", ["inv1", "ru"], ["hot"]),
            node("Cast", ["hot"], ["hotf"], to=1), node("Transpose", ["hotf"], ["hott"],
                                                         perm=[1, 0]),
            node("Unsqueeze", ["hott", "ax2"], ["h2"]), node("Unsqueeze", ["h2", "ax2"], ["mask"]),
            node("Mul", ["hu", "mask"], ["hm"]),
            node("Transpose", ["hm"], ["hmt"], perm=[1, 2, 0, 3]),
            node("Reshape", ["hmt", "rows"], ["hw"]), node("Reshape", ["bu", "outs"], ["bw"]),
            node("Reshape", ["y0", "outs"], ["y0f"]), node("Gemm", ["hw", "bw", "y0f"], ["yf"]),
            node("Reshape", ["yf", "bso"], ["y"])]


def loop(fn: Callable[[], Any], n: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(n):
            fn()
    return run


def run(quick: bool, reps: int, seq: int | None = None, kind: str = "gpt2",
        hidden: int | None = None, layers: int | None = None, equal: bool = False,
        providers: list[str] | None = None) -> list[common.Row]:
    s = spec(kind, quick, hidden, layers)
    providers = providers or ["CPUExecutionProvider"]
    rank = 8 if quick else 16
    seq = seq or (16 if quick else 64)
    ranks = f"ranks {rank}" if equal else f"ranks {rank}/{rank // 2}"
    rows: list[common.Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = model_cases(export_files(s, rank, Path(tmp), equal), seq, s.vocab, providers)
        n = 2 if quick else 10 if seq <= 4 else 3 if seq * s.hidden <= 64 * 256 else 1
        for k, calls in cases.items():
            t = common.interleaved({name: loop(fn, n) for name, fn in calls.items()}, reps)
            note = f"batch {BATCH} x seq {seq}, {k} adapters ({ranks})"
            rows.append(common.row("mixed batch", s.name, f"mixed k={k}", f"split k={k}",
                                   t["mixed"], t["split"], target="<= 1.0" if k >= 4 else None,
                                   note=note))
            rows.append(common.row("mixed batch", s.name, f"mixed k={k}", "merged", t["mixed"],
                                   t["merged"], target="<= 1.3", note=note))
            if k > 1:  # what splitting the batch alone does on this machine, without LoRA
                rows.append(common.row("mixed batch", s.name, f"merged in {k} runs", "merged",
                                       t["merged split"], t["merged"], note=note))
    for form_seq in ((16, 1) if quick else (64, 1)):
        for distinct in (4, 16):
            calls = form_sessions(form_seq, distinct, providers)
            t = common.interleaved({name: loop(fn, 5) for name, fn in calls.items()}, reps)
            for form in ("gather", "dense", "einsum", "unique", "unmerged"):
                rows.append(common.row("mixed form", "site 768x2304", form, "merged", t[form],
                                       t["merged"], note=f"batch {BATCH} x seq {form_seq}, r 8, "
                                       f"16 adapters, {distinct} in the batch"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few repeats (CI smoke)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default 64, "
                                                             "quick 16)")
    ap.add_argument("--model", choices=list(TARGETS), default="gpt2")
    ap.add_argument("--hidden", type=int, default=None, help="model width (default 256)")
    ap.add_argument("--layers", type=int, default=None, help="model depth (default 4)")
    ap.add_argument("--equal-ranks", action="store_true", help="every adapter of rank 16")
    ap.add_argument("--cuda", action="store_true",
                    help="ONNX Runtime's CUDA provider (set LORAFX_BENCH_CLOCK=wall)")
    ap.add_argument("--json", "--out", dest="json", help="write rows here")
    args = ap.parse_args()
    common.setup_torch()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.cuda else None
    common.emit(run(args.quick, args.reps or (2 if args.quick else 9), args.seq, args.model,
                    args.hidden, args.layers, args.equal_ranks, providers), args.json)


if __name__ == "__main__":
    main()
