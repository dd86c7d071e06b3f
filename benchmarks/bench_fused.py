"""Fused vs unfused KV decoder files (``lora_fx.onnx.fuse``, issue 25 item 1) under ORT GenAI.

A LLaMA at the 135M decoder's shape (30 layers, hidden 576, intermediate 1536, 9/3 heads,
vocabulary 49152, tied embeddings; random weights) is exported once with its KV cache unfused
(``export_kv(fuse=False)``); the fused file is the same graph through ``onnx.fuse.fuse`` (what
``export_kv`` does by default), saved beside it with the same side files. Both run in ORT GenAI
(1 thread, CPU): prefill of a 128-token prompt and decode ms per token, median of ``--reps``,
the two files alternated; the greedy tokens of both are compared.

    python benchmarks/bench_fused.py [--out DIR] [--reps 5] [--steps 32] [--layers 30]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(layers: int) -> Any:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
        max_position_embeddings=2048)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def files(out: Path, layers: int) -> dict[str, Path]:
    import onnx_ir as ir

    from lora_fx.onnx.export import export_kv
    from lora_fx.onnx.fuse import fuse

    plain, fused = out / "unfused", out / "fused"
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    export_kv(build(layers), plain / "model.onnx", verify=False, fuse=False)
    print(f"export (unfused): {time.perf_counter() - start:.1f} s", flush=True)
    model = ir.load(str(plain / "model.onnx"))
    start = time.perf_counter()
    counts = fuse(model)
    print(f"fuse: {time.perf_counter() - start:.1f} s, {counts}", flush=True)
    if fused.exists():
        shutil.rmtree(fused)
    fused.mkdir(parents=True)
    for side in plain.iterdir():
        if not side.name.startswith("model.onnx"):
            shutil.copy(side, fused / side.name)
    ir.save(model, str(fused / "model.onnx"), external_data="model.onnx.data")
    return {"unfused": plain, "fused": fused}


def nodes(path: Path) -> Counter[str]:
    import onnx

    proto = onnx.load(str(path / "model.onnx"), load_external_data=False)
    return Counter(node.op_type for node in proto.graph.node)


def runner(folder: Path, prompt: list[int], steps: int) -> Any:
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": 1, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)

    def run() -> tuple[float, float, list[int]]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + steps + 1, do_sample=False)
        gen = og.Generator(model, params)
        start = time.perf_counter()
        gen.append_tokens(np.asarray([prompt], dtype=np.int32))
        prefill = time.perf_counter() - start
        gen.generate_next_token()
        start = time.perf_counter()
        for _ in range(steps):
            gen.generate_next_token()
        decode = (time.perf_counter() - start) / steps
        return prefill * 1e3, decode * 1e3, list(gen.get_sequence(0))[len(prompt):]
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_fused"))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--reuse", action="store_true", help="keep the files of a last run")
    args = parser.parse_args(argv)
    folders = {"unfused": args.out / "unfused", "fused": args.out / "fused"} \
        if args.reuse and (args.out / "fused" / "model.onnx").exists() \
        else files(args.out, args.layers)
    prompt = np.random.default_rng(0).integers(3, 49000, args.prompt).tolist()
    runs = {name: runner(folder, prompt, args.steps) for name, folder in folders.items()}
    times: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n in runs}
    tokens: dict[str, list[int]] = {}
    for name, run in runs.items():  # warm-up
        tokens[name] = run()[2]
    for _ in range(args.reps):
        for name, run in runs.items():
            prefill, decode, _ = run()
            times[name]["prefill"].append(prefill)
            times[name]["decode"].append(decode)
    result: dict[str, Any] = {}
    for name in runs:
        count = nodes(folders[name])
        result[name] = {"prefill_ms": statistics.median(times[name]["prefill"]),
                        "decode_ms_per_token": statistics.median(times[name]["decode"]),
                        "nodes": sum(count.values()),
                        "top_ops": dict(count.most_common(8))}
    result["same_tokens"] = tokens["fused"] == tokens["unfused"]
    result["settings"] = {"threads": 1, "prompt": args.prompt, "steps": args.steps,
                          "reps": args.reps, "layers": args.layers}
    print(json.dumps(result, indent=1))
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
