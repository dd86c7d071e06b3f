"""lora_fx.train.fast: fused branches (y + s·(x Aᵀ) Bᵀ in one addmm) and training_graph
(fused branches, fused tanh GELU, wide linears in blocks, on a copy) equal PEFT's forward and
gradients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import lora_fx
from lora_fx.graph.state import NODE_KEY
from lora_fx.passes import wide_linear as wl
from lora_fx.passes.fuse_branches import lora_addmm
from lora_fx.train.fast import compiled, fuse_branches, training_graph
from tests.helpers import (
    count_calls,
    logits_of,
    peft_model_like,
    randomize_lora,
    tiny_gpt2,
    tiny_llama,
    token_ids,
)


def _pair(make: Any, targets: list[str], dropout: float = 0.0) -> tuple[Any, Any, Any]:
    """(base, plain injected, fused injected) with the same random A and B."""
    base = make()
    ids = token_ids()
    cfg = lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout)
    plain = lora_fx.inject(base, (ids,), cfg)
    randomize_lora(plain, seed=3)
    fused = lora_fx.inject(base, (ids,), cfg)
    randomize_lora(fused, seed=3)
    fuse_branches(fused)
    return base, plain.eval(), fused.eval()


@pytest.mark.parametrize("make,targets", [(tiny_gpt2, ["c_attn", "c_proj"]),
                                          (tiny_llama, ["q_proj", "v_proj", "down_proj"])])
def test_fused_equals_peft_and_plain_forward_and_grads(make: Any, targets: list[str]) -> None:
    base, plain, fused = _pair(make, targets)
    ids = token_ids(3, 7, seed=4)
    want = logits_of(peft_model_like(base, plain, r=4, lora_alpha=8, target_modules=targets)(ids))
    got = logits_of(fused(ids))
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)
    # same gradients for A and B as the unfused graph (scale applied inside the GEMM)
    logits_of(plain(ids)).square().mean().backward()
    logits_of(fused(ids)).square().mean().backward()
    for p, q in zip(lora_fx.lora_parameters(plain), lora_fx.lora_parameters(fused), strict=True):
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4)


def test_fused_graph_structure_merge_and_adapter(tmp_path: Path) -> None:
    base, plain, fused = _pair(tiny_gpt2, ["c_attn"])
    n_sites = len(lora_fx.branches(fused))
    calls = [n for n in fused.graph.nodes if n.op == "call_module" and NODE_KEY in n.meta]
    addmms = [n for n in fused.graph.nodes if n.target is lora_addmm]
    assert not calls and len(addmms) == n_sites
    assert all(n.meta[NODE_KEY]["role"] == "add" for n in addmms)
    ids = token_ids(2, 5, seed=6)
    merged = lora_fx.merge(fused)
    assert not any(NODE_KEY in n.meta for n in merged.graph.nodes)
    torch.testing.assert_close(logits_of(merged(ids)), logits_of(plain(ids)), atol=1e-5, rtol=1e-5)
    lora_fx.save_adapter(fused, tmp_path / "a")
    again = lora_fx.load_adapter(base, (token_ids(),), tmp_path / "a")
    torch.testing.assert_close(logits_of(again.eval()(ids)), logits_of(plain(ids)), atol=1e-6,
                               rtol=1e-6)


def test_fused_keeps_dropout_module_and_is_idempotent() -> None:
    _, plain, fused = _pair(tiny_llama, ["q_proj"], dropout=0.5)
    drops = [n for n in fused.graph.nodes if n.op == "call_module"
             and str(n.target).endswith("lora_dropout")]
    assert len(drops) == len(lora_fx.branches(fused))
    ids = token_ids()
    torch.testing.assert_close(logits_of(fused(ids)), logits_of(plain(ids)), atol=1e-5, rtol=1e-5)
    fused.train()
    torch.manual_seed(0)
    a = logits_of(fused(ids))
    torch.manual_seed(0)
    b = logits_of(plain.train()(ids))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # same mask stream, same math
    before = len(fused.graph.nodes)
    fuse_branches(fused)
    assert len(fused.graph.nodes) == before


@pytest.mark.slow
def test_compiled_equals_peft() -> None:
    """torch.compile of the fused graph (inductor on CPU needs a C++ compiler: slow)."""
    base, plain, fused = _pair(tiny_llama, ["q_proj", "v_proj"])
    fn = compiled(fused)
    ids = token_ids(2, 8, seed=1)
    want = logits_of(peft_model_like(base, plain, r=4, lora_alpha=8,
                                   target_modules=["q_proj", "v_proj"])(ids))
    torch.testing.assert_close(logits_of(fn(ids)), want.detach(), atol=1e-5, rtol=1e-5)



# --- training_graph: fused branches, fused tanh GELU and wide linears, on a copy --------------


def test_training_graph_equals_peft_and_leaves_gm_alone(tmp_path: Path) -> None:
    base = tiny_gpt2()
    targets = ["c_attn", "c_fc"]
    gm = lora_fx.inject(base, (token_ids(),), lora_fx.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets))
    randomize_lora(gm, seed=5)
    layers = base.config.n_layer
    assert count_calls(gm, "aten.tanh") == layers
    train = training_graph(gm).eval()
    assert count_calls(train, "aten.gelu") == layers and count_calls(train, "aten.tanh") == 0
    assert count_calls(train, "lora_addmm") == len(lora_fx.branches(gm))
    assert count_calls(gm, "aten.tanh") == layers  # gm untouched
    assert count_calls(gm, "lora_addmm") == 0
    ids = token_ids(3, 7, seed=8)
    pm = peft_model_like(base, gm, r=4, lora_alpha=8, target_modules=targets)
    torch.testing.assert_close(logits_of(train(ids)), logits_of(pm(ids)).detach(),
                               atol=1e-5, rtol=1e-5)
    # the copy trains gm's own parameters: same gradients as PEFT's A and B
    logits_of(train(ids)).square().mean().backward()
    logits_of(pm(ids)).square().mean().backward()
    peft_grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    for site, branch in lora_fx.branches(gm).items():
        for ours, key in ((branch.lora_A.weight, "lora_A"), (branch.lora_B.weight, "lora_B")):
            want = next(g for n, g in peft_grads.items() if f"{site}.{key}." in n)
            assert ours.grad is not None
            torch.testing.assert_close(ours.grad, want, atol=1e-5, rtol=1e-4)
    assert {id(p) for p in lora_fx.lora_parameters(train)} == \
        {id(p) for p in lora_fx.lora_parameters(gm)}


@pytest.mark.parametrize("use_blocks", [True, False])
def test_training_graph_routes_the_lm_head_and_equals_peft(
        monkeypatch: pytest.MonkeyPatch, use_blocks: bool) -> None:
    monkeypatch.setattr(wl, "_choice", {})
    monkeypatch.setattr(wl, "_tune", lambda x, w, b: use_blocks)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=9001,
                                      n_positions=32, use_cache=False)).eval()
    targets = ["c_attn"]
    gm = lora_fx.inject(base, (token_ids(),), lora_fx.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets))
    randomize_lora(gm, seed=6)
    train = training_graph(gm)
    assert count_calls(train, "wide_linear") == 1 and count_calls(gm, "wide_linear") == 0
    ids = token_ids(2, 9, seed=4)
    pm = peft_model_like(base, gm, r=4, lora_alpha=8, target_modules=targets)
    ours, ref = logits_of(train(ids)), logits_of(pm(ids))
    torch.testing.assert_close(ours, ref.detach(), atol=1e-5, rtol=1e-5)
    assert len(wl._choice) == 1
    ours.square().sum().backward()  # a sum: gradients of order 1, so rtol decides
    ref.square().sum().backward()
    peft_grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    for site, branch in lora_fx.branches(gm).items():
        want = next(g for n, g in peft_grads.items() if f"{site}.lora_B." in n)
        assert branch.lora_B.weight.grad is not None
        torch.testing.assert_close(branch.lora_B.weight.grad, want, atol=1e-4, rtol=1e-4)

