"""Training step: lorafx vs PEFT (same targets, rank, optimizer, data) vs full fine-tuning.

A step is ``zero_grad; loss = CE(model(ids)); loss.backward(); AdamW.step()``. Variants:

- ``full``: every parameter trains (the model without LoRA);
- ``peft``: ``peft.get_peft_model`` with PEFT's default targets for the architecture;
- ``lorafx``: ``lora_fx.inject`` on the same model, same A and B (checked: same loss);
- ``lorafx-fused``: ``lora_fx.fuse_branches`` on top (scale inside one addmm per site);
- ``lorafx-fast``: ``lora_fx.training_graph`` (branches fused and the written-out tanh
  GELU as one kernel), the graph lorafx trains with;
- ``frozen``: the floor of any LoRA implementation: the base model with nothing trainable,
  each target module's output made to require grad (as a LoRA branch makes it), so that the
  backward runs exactly where a LoRA step's must: into every target and, through the frozen
  weights, into every input that depends on an earlier target. No optimizer. These are the
  GEMMs every LoRA step runs whatever the LoRA code does;
- ``*-compiled`` (``--compile``): ``torch.compile`` of the lorafx graph, of the PEFT model and
  of the frozen floor (the floor of any compiled LoRA step).

Time: interleaved repeats in one process. Memory (``--memory``): one fresh process per variant,
peak resident memory added over two steps (activations, gradients, optimizer state).
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import models  # noqa: E402
import torch  # noqa: E402

R, ALPHA = 8, 16


def make_variant(name: str, base: Any, tokens: Any, s: models.Spec) -> tuple[Any, list[Any]]:
    """(module to call, trainable parameters) of variant ``name``; ``base`` is not modified."""

    import lora_fx

    kind = name.removesuffix("-compiled")
    if kind == "frozen":
        model = copy.deepcopy(base).train()
        for p in model.parameters():
            p.requires_grad_(False)
        anchor = torch.zeros((), requires_grad=True)
        for path, module in model.named_modules():
            if path.rsplit(".", 1)[-1] in s.targets:
                module.register_forward_hook(
                    lambda mod, args, out, anchor=anchor: _NeedsGrad.apply(out, anchor))
        params = []
    elif kind == "full":
        model = copy.deepcopy(base).train()
        for p in model.parameters():
            p.requires_grad_(True)
        params = list(model.parameters())
    elif kind == "peft":
        import peft

        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=R, lora_alpha=ALPHA, target_modules=list(s.targets), lora_dropout=0.0)).train()
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        cfg = lora_fx.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(s.targets),
                                 lora_dropout=0.0)
        model = lora_fx.inject(copy.deepcopy(base), (tokens,), cfg).train()
        params = lora_fx.lora_parameters(model)
        if kind == "lorafx-fused":
            from lora_fx.train.fast import fuse_branches

            fuse_branches(model)
        elif kind == "lorafx-fast":
            from lora_fx.train.fast import training_graph

            model = training_graph(model)
    if name.endswith("-compiled"):
        model = torch.compile(model)
    return model, params


class _NeedsGrad(torch.autograd.Function):
    """Identity on ``x`` whose output requires grad (``anchor`` does). Its backward passes the
    gradient on to ``x`` unchanged, and gives ``anchor`` the gradient's sum: under
    ``torch.compile`` only what a leaf's gradient depends on is computed, and this makes that
    every target output's gradient, as in a LoRA step (one reduction per target is the cost)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, grad.sum()


def _randomize(variants: dict[str, tuple[Any, list[Any]]]) -> None:
    """Same non-zero A and B in every LoRA variant (B = 0 would hide a wrong branch)."""

    import lora_fx

    g = torch.Generator().manual_seed(0)
    ref = next((m for n, (m, _) in variants.items() if n.startswith("lorafx")), None)
    if ref is None:
        return
    ref_gm = getattr(ref, "_orig_mod", ref)
    values = {n: (torch.randn(b.lora_A.weight.shape, generator=g) * 0.02,
                  torch.randn(b.lora_B.weight.shape, generator=g) * 0.02)
              for n, b in lora_fx.branches(ref_gm).items()}
    with torch.no_grad():
        for name, (model, _) in variants.items():
            inner = getattr(model, "_orig_mod", model)
            if name.startswith("lorafx"):
                for site, b in lora_fx.branches(inner).items():
                    b.lora_A.weight.copy_(values[site][0])
                    b.lora_B.weight.copy_(values[site][1])
            elif name.startswith("peft"):
                for site, (a, bw) in values.items():
                    mod = inner.base_model.model.get_submodule(site)
                    mod.lora_A["default"].weight.copy_(a)
                    mod.lora_B["default"].weight.copy_(bw)


def step_fn(model: Any, params: list[Any], tokens: Any) -> Callable[[], float]:

    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> float:
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        loss = models.causal_lm_loss(model(tokens), tokens)
        loss.backward()
        if opt is not None:
            opt.step()
        return float(loss.detach())

    return step


def time_variants(s: models.Spec, names: list[str], batch: int, seq: int, reps: int
                  ) -> dict[str, Any]:
    """Interleaved step times, and the first-step loss of each variant (must agree)."""

    base = models.build(s)
    tokens = models.ids(s, batch, seq)
    variants = {n: make_variant(n, base, tokens, s) for n in names}
    _randomize(variants)
    losses = {}
    with torch.no_grad():
        for n, (m, _) in variants.items():
            losses[n] = float(models.causal_lm_loss(m(tokens), tokens))
    steps = {n: step_fn(m, p, tokens) for n, (m, p) in variants.items()}
    times = common.interleaved(steps, reps, warmup=2)
    return {"times": times, "losses": losses}


def memory_of(kind: str, name: str, quick: bool, batch: int, seq: int) -> float | None:
    """Peak memory added by two steps of one variant, in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--memory-child", name, "--model", kind,
                          "--batch", str(batch), "--seq", str(seq)] + (["--quick"] if quick
                                                                       else []),
                         capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("PEAK_MIB ")]
    return float(lines[-1].split()[1]) if lines and lines[-1].split()[1] != "None" else None


def _memory_child(kind: str, name: str, quick: bool, batch: int, seq: int) -> None:
    s = models.spec(kind, quick)
    base = models.build(s)
    tokens = models.ids(s, batch, seq)
    model, params = make_variant(name, base, tokens, s)
    step = step_fn(model, params, tokens)
    _, peak = common.peak_memory(lambda: (step(), step()))
    print(f"PEAK_MIB {peak}")


def run(quick: bool, kinds: list[str], reps: int, compile_: bool, memory: bool,
        batch: int | None = None, seq: int | None = None) -> list[common.Row]:
    rows: list[common.Row] = []
    batch = batch or (2 if quick else 4)
    seq = seq or (16 if quick else 128)
    names = ["lorafx", "lorafx-fused", "lorafx-fast", "peft", "full", "frozen"]
    if compile_:
        names += ["lorafx-fast-compiled", "peft-compiled", "frozen-compiled"]
    for kind in kinds:
        s = models.spec(kind, quick)
        res = time_variants(s, names, batch, seq, reps)
        t, losses = res["times"], res["losses"]
        agree = max(abs(losses[n] - losses["peft"]) for n in names
                    if n.removesuffix("-compiled") not in ("full", "frozen"))
        shape = f"batch {batch} x seq {seq}, r={R}, targets {','.join(s.targets)}"
        for case, base_name, target in (
                ("lorafx-fast", "peft", "<= 0.95"), ("lorafx", "peft", None),
                ("lorafx-fused", "peft", None), ("lorafx-fast", "full", "<= 0.8"),
                ("lorafx", "full", None), ("peft", "full", None), ("frozen", "peft", None),
                ("lorafx-fast", "frozen", None),
                ("lorafx-fast-compiled", "peft-compiled", "<= 0.95"),
                ("lorafx-fast-compiled", "lorafx-fast", None),
                ("frozen-compiled", "peft-compiled", None),
                ("lorafx-fast-compiled", "frozen-compiled", None)):
            if case in t and base_name in t:
                rows.append(common.row("train step", s.name, case, base_name, t[case],
                                       t[base_name], target=target, note=shape,
                                       loss_diff_vs_peft=agree))
        if memory:
            mem = {n: memory_of(kind, n, quick, batch, seq) for n in ("lorafx-fast", "peft",
                                                                      "full")}
            for case, base_name in (("lorafx-fast", "peft"), ("lorafx-fast", "full")):
                a, b = mem[case], mem[base_name]
                if a is not None and b is not None:
                    rows.append(common.row("train step memory", s.name, case, base_name, [a],
                                           [b], metric="peak_mib", note=shape))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", action="append", choices=["gpt2", "llama"])
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="add torch.compile variants")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", help="write rows here")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=None, help="default 4 (quick: 2)")
    ap.add_argument("--seq", type=int, default=None, help="default 128 (quick: 16)")
    args = ap.parse_args()
    common.setup_torch()
    kinds = args.model or ["gpt2", "llama"]
    if args.memory_child:
        _memory_child(kinds[0], args.memory_child, args.quick, args.batch or 4, args.seq or 128)
        return
    reps = args.reps or (3 if args.quick else 7)
    common.emit(run(args.quick, kinds, reps, args.compile, not args.no_memory, args.batch,
                    args.seq), args.json)


if __name__ == "__main__":
    main()
