"""Training step on a mixture-of-experts model: lorafx vs PEFT's target_parameters (issue 26).

A Mixtral-shaped decoder built from a config (8 experts, top 2; nothing downloaded), LoRA r = 8,
alpha 16 on the attention's q_proj, v_proj and on both expert stacks (``mlp.experts.gate_up_proj``,
``mlp.experts.down_proj``, PEFT's ``target_parameters``), the same random non-zero A and B in
both (the first-step losses are checked to agree). A step is ``zero_grad; loss =
CE(model(ids)); loss.backward(); AdamW.step()``.

- ``peft``: ``get_peft_model`` on the model as users build it (transformers' default experts
  implementation); each forward materializes W + s·B@A for every expert of each stack;
- ``lorafx``: ``lora_fx.inject``: the branch computes (x A_e) B_e on the routed rows only;
- ``floor``: what any LoRA step must compute at least: lorafx's captured base model with every
  weight frozen but the first layer's input norm (a few hundred numbers), so that the backward
  runs through every layer (dx everywhere, no weight-gradient GEMM), as a LoRA step's must.

Where the floor is far below PEFT's step, PEFT's overhead is large: its weight-gradient GEMM per
expert stack and the [E, out, in] materialization of W + s·B@A and its backward (~3·r /
(rows per expert) of an expert GEMM). lorafx's step approaches the floor, so its ratio to PEFT
falls with the rows each expert gets: below 0.5 at a few rows per expert (short sequences,
many experts), about 0.8 at 128 rows per expert (batch 4 x 128, 8 experts, top 2).

Time: interleaved repeats in one process (the ratio is the median of per-repeat ratios).
Memory (``--memory``): peak resident memory added over two steps, each variant in a fresh
process. Target (issue 26): lorafx <= 0.5x PEFT's step time, and less memory.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import models  # noqa: E402
import torch  # noqa: E402

R, ALPHA = 8, 16
TARGETS = ["q_proj", "v_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
SHAPES = {  # (hidden, intermediate, experts, layers, vocab): Mixtral's proportions (I = 3.5 H,
    # the experts ~80% of a token's multiply-adds), scaled down to run on a 2-core CPU
    "full": (256, 896, 8, 4, 2000),
    "quick": (64, 224, 8, 2, 500),
}


def build(quick: bool) -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    hidden, inter, experts, layers, vocab = SHAPES["quick" if quick else "full"]
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, num_local_experts=experts,
        num_experts_per_tok=2, max_position_embeddings=1024, use_cache=False,
        attention_dropout=0.0)).eval()


def tokens(quick: bool, batch: int, seq: int) -> torch.Tensor:
    vocab = SHAPES["quick" if quick else "full"][4]
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def make(name: str, base: torch.nn.Module, ids: torch.Tensor) -> tuple[Any, list[Any]]:
    """(module, trainable parameters) of variant ``name``, with the shared random A and B."""
    import lora_fx

    cfg = dict(r=R, lora_alpha=ALPHA, target_modules=TARGETS, target_parameters=EXPERTS)
    ref = lora_fx.inject(copy.deepcopy(base), (ids,), lora_fx.LoraConfig(**cfg))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in lora_fx.branches(ref).values():
            for w in (b.lora_A.weight, b.lora_B.weight):
                w.copy_(torch.randn(w.shape, generator=g) * 0.02)
    if name == "lorafx":
        return ref.train(), lora_fx.lora_parameters(ref)
    if name == "floor":
        floor = lora_fx.capture(copy.deepcopy(base), (ids,)).train()
        for p in floor.parameters():
            p.requires_grad_(False)
        norm = floor.get_parameter("model.layers.0.input_layernorm.weight")
        return floor, [norm.requires_grad_(True)]
    import peft

    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg)).train()
    state = {f"base_model.model.{b.peft_name or n}.lora_{ab}.default.weight":
             getattr(b, f"lora_{ab}").weight.detach()
             for n, b in lora_fx.branches(ref).items() for ab in "AB"}
    assert not model.load_state_dict(state, strict=False).unexpected_keys
    return model, [p for p in model.parameters() if p.requires_grad]


def step_fn(model: Any, params: list[Any], ids: torch.Tensor) -> Any:
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = models.causal_lm_loss(model(ids), ids)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def memory_of(name: str, quick: bool, batch: int, seq: int) -> float | None:
    out = subprocess.run([sys.executable, __file__, "--memory-child", name, "--batch",
                          str(batch), "--seq", str(seq)] + (["--quick"] if quick else []),
                         capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("PEAK_MIB ")]
    return float(lines[-1].split()[1]) if lines and lines[-1].split()[1] != "None" else None


def _memory_child(name: str, quick: bool, batch: int, seq: int) -> None:
    ids = tokens(quick, batch, seq)
    model, params = make(name, build(quick), ids)
    step = step_fn(model, params, ids)
    _, peak = common.peak_memory(lambda: (step(), step()))
    print(f"PEAK_MIB {peak}")


def run(quick: bool, reps: int, memory: bool, batch: int, seq: int) -> list[common.Row]:
    base, ids = build(quick), tokens(quick, batch, seq)
    variants = {n: make(n, base, ids) for n in ("lorafx", "peft", "floor")}
    with torch.no_grad():
        losses = {n: float(models.causal_lm_loss(m(ids), ids)) for n, (m, _) in variants.items()}
    times = common.interleaved({n: step_fn(m, p, ids) for n, (m, p) in variants.items()},
                               reps, warmup=2)
    hidden, inter, experts, layers, _ = SHAPES["quick" if quick else "full"]
    shape = (f"Mixtral {layers} x {hidden}, {experts} experts of {inter}, top 2; batch {batch} x"
             f" seq {seq}, r={R}, q_proj,v_proj + gate_up_proj,down_proj")
    agree = abs(losses["lorafx"] - losses["peft"])
    note = f"{shape}; first-step loss |lorafx - peft| = {agree:.2e}"
    rows = [common.row("moe_train", "mixtral-moe", case, base_name, times[case],
                       times[base_name], target=target, note=note, losses=losses)
            for case, base_name, target in (("lorafx", "peft", "<= 0.5"),
                                            ("floor", "peft", None), ("lorafx", "floor", None))]
    if memory:
        mem = {n: memory_of(n, quick, batch, seq) for n in ("lorafx", "peft")}
        if all(v is not None for v in mem.values()):
            rows.append(common.row("moe_train", "mixtral-moe", "lorafx", "peft", [mem["lorafx"]],
                                   [mem["peft"]], metric="peak_mib", target="<= 1.0", note=shape,
                                   paired=False))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--memory", action="store_true", help="also peak memory (fresh processes)")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()
    common.setup_torch()
    batch, seq = args.batch or (2 if args.quick else 4), args.seq or (16 if args.quick else 128)
    if args.memory_child:
        _memory_child(args.memory_child, args.quick, batch, seq)
        return
    reps = args.reps or (3 if args.quick else 10)
    common.emit(run(args.quick, reps, args.memory, batch, seq), args.json)


if __name__ == "__main__":
    main()
