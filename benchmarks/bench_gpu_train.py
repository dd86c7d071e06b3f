"""Training step on the GPU in bf16: lorafx vs PEFT vs full fine-tuning vs the frozen floor.

    python benchmarks/bench_gpu_train.py --device cuda                # LLaMA 1.1B, GPT-2 medium
    python benchmarks/bench_gpu_train.py --device cuda --model llama-1.1b --no-compile
    python benchmarks/bench_gpu_train.py --device cpu --quick         # CPU rehearsal (CI)

The base model is bf16 on ``--device``; a step is ``zero_grad; loss = CE(model(ids));
backward; AdamW.step()``. Variants (same model, data, targets, rank; the LoRA ones carry the
same random non-zero A and B, and their first-step losses are reported against PEFT's):

- ``lorafx``: ``lora_fx.inject`` (fp32 factors, computed in bf16 from them: the default
  ``branch_compute="input"``); ``lorafx-adapter``: ``branch_compute="adapter"`` (PEFT's
  casts: the input to fp32, Δ back); ``lorafx-fast``: ``training_graph``; ``*-compiled``:
  ``torch.compile`` of it;
- ``peft`` / ``peft-compiled``: ``peft.get_peft_model`` (fp32 factors by its default);
- ``full``: every parameter trains (bf16 AdamW);
- ``frozen`` / ``frozen-compiled``: the floor of any LoRA step, the base with nothing
  trainable whose target outputs require grad (``bench_train.make_variant``).

Time: wall clock of synchronized steps, variants interleaved, medians and paired ratios.
Memory (CUDA only): the peak allocated memory two steps add (activations, gradients, AdamW
state) over what the variant held before, each variant measured alone before the timing.
Writes JSON (``--json``) and prints a Markdown table; the issue's targets are marked.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train  # noqa: E402
import common  # noqa: E402
import torch  # noqa: E402

LLAMA7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPU_MODELS: dict[str, dict[str, Any]] = {  # (the shapes) name: config
    "llama-1.1b": dict(kind="llama", layers=22, hidden=2048, heads=32, kv=4, inter=5632,
                       vocab=32000, targets=LLAMA7),
    "gpt2-medium": dict(kind="gpt2", layers=24, hidden=1024, heads=16, vocab=50257,
                        targets=("c_attn", "c_proj", "c_fc")),
}
QUICK_MODELS: dict[str, dict[str, Any]] = {
    "llama-tiny": dict(kind="llama", layers=2, hidden=64, heads=4, kv=2, inter=128,
                       vocab=1000, targets=LLAMA7),
    "gpt2-tiny": dict(kind="gpt2", layers=2, hidden=64, heads=4, vocab=1000,
                      targets=("c_attn", "c_proj", "c_fc")),
}
EAGER = ["lorafx", "lorafx-adapter", "lorafx-fast", "peft", "full", "frozen"]
COMPILED = ["lorafx-fast-compiled", "peft-compiled", "frozen-compiled"]
COMPARE = (  # (case, baseline, the target or None)
    ("lorafx-fast-compiled", "peft-compiled", "<= 0.75"),
    ("lorafx-fast-compiled", "frozen-compiled", "<= 1.15"),
    ("lorafx-fast", "full", "<= 1.0"), ("lorafx", "full", "<= 1.0"),
    ("lorafx-fast", "peft", None), ("lorafx", "peft", None), ("peft", "full", None),
    ("lorafx-adapter", "lorafx", None), ("lorafx-fast", "frozen", None),
    ("frozen-compiled", "peft-compiled", None))


def build(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The model of ``cfg`` with seeded random weights on ``device`` in ``dtype``."""
    torch.manual_seed(0)
    if cfg["kind"] == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        model: torch.nn.Module = LlamaForCausalLM(LlamaConfig(
            num_hidden_layers=cfg["layers"], hidden_size=cfg["hidden"],
            num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv"],
            intermediate_size=cfg["inter"], vocab_size=cfg["vocab"],
            max_position_embeddings=2048, use_cache=False, tie_word_embeddings=False,
            bos_token_id=0, eos_token_id=0, pad_token_id=0))
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(
            n_layer=cfg["layers"], n_embd=cfg["hidden"], n_head=cfg["heads"],
            vocab_size=cfg["vocab"], n_positions=2048, use_cache=False, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0))
    return model.to(device=device, dtype=dtype).eval()


def variant(name: str, base: torch.nn.Module, tokens: torch.Tensor, targets: tuple[str, ...],
            rank: int, injected: dict[str, Any]) -> tuple[Any, list[torch.Tensor]]:
    """(module to call, trainable parameters) of ``name``; ``base`` is not modified. The
    lorafx variants of one ``branch_compute`` share one injected model (``injected``): the
    graphs differ, the parameters are the same (each variant has its own optimizer)."""
    import lora_fx

    kind = name.removesuffix("-compiled")
    if kind in ("lorafx", "lorafx-adapter", "lorafx-fast"):
        compute = "adapter" if kind == "lorafx-adapter" else "input"
        if compute not in injected:
            cfg = lora_fx.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                     branch_compute=compute)
            injected[compute] = lora_fx.inject(base, (tokens,), cfg).train()
        gm = injected[compute]
        model: Any = lora_fx.training_graph(gm) if kind == "lorafx-fast" else gm
        params = lora_fx.lora_parameters(gm)
    elif kind == "peft":
        import peft

        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=0.0))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
    elif kind == "full":
        model = copy.deepcopy(base).train()
        params = [p.requires_grad_(True) for p in model.parameters()]
    else:
        model, params = frozen(base, targets), []
    if name.endswith("-compiled"):
        model = torch.compile(model)
    return model, params


def frozen(base: torch.nn.Module, targets: tuple[str, ...]) -> torch.nn.Module:
    """The floor (``bench_train``'s ``frozen``): nothing trainable, every target's output
    made to require grad through an anchor on the model's device."""
    model = copy.deepcopy(base).train()
    for p in model.parameters():
        p.requires_grad_(False)
    ref = next(model.parameters())
    anchor = torch.zeros((), device=ref.device, dtype=ref.dtype, requires_grad=True)
    for path, module in model.named_modules():
        if path.rsplit(".", 1)[-1] in targets:
            module.register_forward_hook(
                lambda mod, args, out, a=anchor: bench_train._NeedsGrad.apply(out, a))
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_steps(step: Callable[[], float], device: torch.device) -> tuple[float, float | None]:
    """(the first step's loss, MiB of peak allocated memory two steps add: CUDA only)."""
    cuda = device.type == "cuda"
    gc.collect()
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else 0
    loss = step()
    step()
    _sync(device)
    return loss, (torch.cuda.max_memory_allocated(device) - before) / 2**20 if cuda else None


def timed(steps: dict[str, Callable[[], float]], reps: int, device: torch.device
          ) -> dict[str, list[float]]:
    """Wall seconds per step, ``reps`` interleaved rounds (each step ends in a sync)."""
    times: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(reps):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def run_model(name: str, cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    device, dtype = torch.device(args.device), torch.bfloat16
    base = build(cfg, device, dtype)
    tokens = torch.randint(1, cfg["vocab"], (args.batch, args.seq),
                           generator=torch.Generator().manual_seed(1)).to(device)
    names = EAGER + ([] if args.no_compile else COMPILED)
    variants: dict[str, tuple[Any, list[torch.Tensor]]] = {}
    memory: dict[str, float | None] = {}
    losses: dict[str, float] = {}
    steps: dict[str, Callable[[], float]] = {}
    injected: dict[str, Any] = {}
    for n in names:
        start = time.perf_counter()
        variants[n] = variant(n, base, tokens, cfg["targets"], args.rank, injected)
        bench_train._randomize({k: v for k, v in variants.items() if k == n or
                                k.startswith("lorafx")})  # the same A, B (shared ones reset)
        steps[n] = bench_train.step_fn(*variants[n], tokens)
        losses[n], memory[n] = first_steps(steps[n], device)  # also the warm-up (compile)
        print(f"[{name}] {n}: first loss {losses[n]:.4f}, memory {memory[n]} MiB, set-up "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    times = timed(steps, args.reps, device)
    return {"model": name, "shape": f"batch {args.batch} x seq {args.seq}, r {args.rank}, "
            f"bf16, targets {','.join(cfg['targets'])}", "times": times, "memory": memory,
            "losses": losses}


def rows(result: dict[str, Any]) -> list[common.Row]:
    t, mem, out = result["times"], result["memory"], []
    agree = max((abs(result["losses"][n] - result["losses"]["peft"])
                 for n in result["losses"] if n.startswith("lorafx")), default=None)
    for case, base, target in COMPARE:
        if case in t and base in t:
            out.append(common.row("gpu train step", result["model"], case, base, t[case],
                                  t[base], metric="wall_s", target=target,
                                  note=result["shape"], loss_diff_vs_peft=agree))
    for case, base, target in (("lorafx-fast", "peft", "<= 0.7"), ("lorafx", "peft", None),
                               ("lorafx-adapter", "peft", None), ("lorafx-fast", "full", None)):
        a, b = mem.get(case), mem.get(base)
        if a is not None and b:
            out.append(common.row("gpu train memory", result["model"], case, base, [a], [b],
                                  metric="peak_mib", target=target, note=result["shape"]))
    return out


def markdown(all_rows: list[common.Row]) -> str:
    lines = ["| suite | model | case / baseline | ratio (median) | case | baseline | target |",
             "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    for r in all_rows:
        scale = 1e3 if r.metric == "wall_s" else 1.0
        unit = "ms" if r.metric == "wall_s" else "MiB"
        met = "" if r.met is None else (" (met)" if r.met else " (not met)")
        lines.append(f"| {r.suite} | {r.model} | {r.case} / {r.baseline} | "
                     f"{r.ratio.get('median', float('nan')):.3f} | "
                     f"{scale * r.value['median']:.2f} {unit} | "
                     f"{scale * r.baseline_value['median']:.2f} {unit} | "
                     f"{(r.target or '') + met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (the CPU rehearsal)")
    ap.add_argument("--model", action="append", help="a model name (repeatable; default all)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--batch", type=int, default=None, help="default 4 (quick: 2)")
    ap.add_argument("--seq", type=int, default=None, help="default 1024 (quick: 16)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=None, help="default 10 (quick: 2)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    common.setup_torch()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA: the GPU training benchmark is unverified here (use --device cpu "
              "--quick for the rehearsal)")
        return 0
    args.batch = args.batch or (2 if args.quick else 4)
    args.seq = args.seq or (16 if args.quick else 1024)
    args.reps = args.reps or (2 if args.quick else 10)
    table = QUICK_MODELS if args.quick else GPU_MODELS
    results = [run_model(n, table[n], args) for n in (args.model or list(table))]
    all_rows = [r for res in results for r in rows(res)]
    print(markdown(all_rows))
    summary = {n: statistics.median(v) for res in results for n, v in res["times"].items()}
    print(json.dumps({"median_step_s": summary}, indent=1), file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results,
                                               "rows": [r.to_json() for r in all_rows]},
                                              indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
