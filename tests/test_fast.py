"""lora_fx.train.fast: fused branches equal PEFT; ONNX export reuses the captured program safely."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import peft_model_like, randomize_lora, tiny_gpt2, tiny_llama, token_ids

import lora_fx
from lora_fx.capture.program import PROGRAM_KEY, captured_program
from lora_fx.passes.fuse_branches import lora_addmm
from lora_fx.passes.state import NODE_KEY
from lora_fx.train.fast import fuse_branches


def _logits(out: Any) -> torch.Tensor:
    return out["logits"] if isinstance(out, dict) else out[0]


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
    want = _logits(peft_model_like(base, plain, r=4, lora_alpha=8, target_modules=targets)(ids))
    got = _logits(fused(ids))
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)
    # same gradients for A and B as the unfused graph (scale applied inside the GEMM)
    _logits(plain(ids)).square().mean().backward()
    _logits(fused(ids)).square().mean().backward()
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
    torch.testing.assert_close(_logits(merged(ids)), _logits(plain(ids)), atol=1e-5, rtol=1e-5)
    lora_fx.save_adapter(fused, tmp_path / "a")
    again = lora_fx.load_adapter(base, (token_ids(),), tmp_path / "a")
    torch.testing.assert_close(_logits(again.eval()(ids)), _logits(plain(ids)), atol=1e-6,
                               rtol=1e-6)


def test_fused_keeps_dropout_module_and_is_idempotent() -> None:
    _, plain, fused = _pair(tiny_llama, ["q_proj"], dropout=0.5)
    drops = [n for n in fused.graph.nodes if n.op == "call_module"
             and str(n.target).endswith("lora_dropout")]
    assert len(drops) == len(lora_fx.branches(fused))
    ids = token_ids()
    torch.testing.assert_close(_logits(fused(ids)), _logits(plain(ids)), atol=1e-5, rtol=1e-5)
    fused.train()
    torch.manual_seed(0)
    a = _logits(fused(ids))
    torch.manual_seed(0)
    b = _logits(plain.train()(ids))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # same mask stream, same math
    before = len(fused.graph.nodes)
    fuse_branches(fused)
    assert len(fused.graph.nodes) == before


def test_lora_addmm_is_y_plus_scaled_product() -> None:
    g = torch.Generator().manual_seed(0)
    y, xa, b = (torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 4, generator=g),
                torch.randn(5, 4, generator=g))
    torch.testing.assert_close(lora_addmm(y, xa, b, 0.5), y + 0.5 * (xa @ b.t()))


@contextmanager
def _traces() -> Iterator[list[int]]:
    """Records each torch.export.export call made inside (a second trace shows up here)."""
    traced: list[int] = []
    real = torch.export.export

    def spy(*args: Any, **kwargs: Any) -> Any:
        traced.append(1)
        return real(*args, **kwargs)

    torch.export.export = spy  # type: ignore[assignment]
    try:
        yield traced
    finally:
        torch.export.export = real  # type: ignore[assignment]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny GPT-2: merged export through the captured program, and the base export."""
    base = tiny_gpt2()
    ids = token_ids()
    gm = lora_fx.inject(base, (ids,), lora_fx.LoraConfig(r=4, lora_alpha=8,
                                                         target_modules=["c_attn"]))
    randomize_lora(gm, seed=1)
    out = tmp_path_factory.mktemp("fast")
    with _traces() as traced:
        merged = lora_fx.export_onnx(gm, (ids,), out / "m.onnx", merge=True)
    base_gm = lora_fx.capture(base, (ids,))
    base_rep = lora_fx.export_onnx(base_gm, (ids,), out / "b.onnx")
    return {"base": base, "gm": gm, "merged": merged, "base_rep": base_rep, "traced": traced}


def test_merged_export_reuses_capture_and_matches_peft(exported: dict[str, Any]) -> None:
    from lora_fx.ort import runtime

    assert not exported["traced"], "export_onnx traced the model a second time"
    assert exported["merged"].max_abs_diff <= 1e-4
    assert exported["merged"].op_histogram == exported["base_rep"].op_histogram
    probe = token_ids(3, 11, seed=9)  # another batch and length: the axes stayed dynamic
    pm = peft_model_like(exported["base"], exported["gm"], r=4, lora_alpha=8,
                         target_modules=["c_attn"])
    want = _logits(pm(probe)).detach().numpy()
    got = runtime.run(runtime.open_session(exported["merged"].path), (probe,))[0]
    assert np.abs(got - want).max() <= 1e-4


def test_captured_program_refuses_other_graphs(exported: dict[str, Any]) -> None:
    gm = exported["gm"]
    assert PROGRAM_KEY in gm.meta
    assert captured_program(gm) is None              # branches still in the graph
    assert captured_program(lora_fx.merge(gm)) is not None
    plain = torch.nn.Linear(3, 3)
    assert captured_program(plain) is None        # no capture at all


def test_captured_program_refuses_untied_merge() -> None:
    """A LoRA on GPT-2's tied lm_head: the merge unties it, so the graph reads a new weight."""
    base = tiny_gpt2()
    ids = token_ids()
    gm = lora_fx.inject(base, (ids,), lora_fx.LoraConfig(r=4, target_modules=["lm_head"]))
    randomize_lora(gm)
    merged = lora_fx.merge(gm)
    assert captured_program(merged) is None              # its carried program: refused


def test_merged_module_exports_without_a_second_trace(tmp_path: Path) -> None:
    """merge(gm) carries the capture's graph without its weights: export_onnx(merged,
    merge=False) traces nothing, matches PEFT's unmerged model (random B) on another shape,
    and the carried program keeps no unmerged weight alive."""
    import gc
    import weakref

    from lora_fx.ort import runtime
    from lora_fx.passes.state import get_state

    base = tiny_gpt2()
    ids = token_ids()
    gm = lora_fx.inject(base, (ids,), lora_fx.LoraConfig(r=4, lora_alpha=8,
                                                         target_modules=["c_attn"]))
    randomize_lora(gm, seed=2)
    probe = token_ids(3, 11, seed=5)
    pm = peft_model_like(base, gm, r=4, lora_alpha=8, target_modules=["c_attn"])
    want = _logits(pm(probe)).detach().numpy()
    merged = lora_fx.merge(gm)
    assert all(t.is_meta for t in merged.meta[PROGRAM_KEY].state_dict.values())
    state = get_state(gm)
    assert state is not None
    unmerged = [weakref.ref(gm.get_parameter(rec.weight)) for rec in state.sites.values()]
    del gm, base, state
    gc.collect()
    assert all(ref() is None for ref in unmerged)
    with _traces() as traced:
        report = lora_fx.export_onnx(merged, (ids,), tmp_path / "m.onnx", merge=False)
    assert not traced, "export_onnx traced the merged module again"
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    got = runtime.run(runtime.open_session(report.path), (probe,))[0]
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.slow
def test_compiled_equals_peft() -> None:
    """torch.compile of the fused graph (inductor on CPU needs a C++ compiler: slow)."""
    from lora_fx.train.fast import compiled

    base, plain, fused = _pair(tiny_llama, ["q_proj", "v_proj"])
    fn = compiled(fused)
    ids = token_ids(2, 8, seed=1)
    want = _logits(peft_model_like(base, plain, r=4, lora_alpha=8,
                                   target_modules=["q_proj", "v_proj"])(ids))
    torch.testing.assert_close(_logits(fn(ids)), want.detach(), atol=1e-5, rtol=1e-5)


# --- training_graph: fused branches and fused tanh GELU on a copy --------------------------


def _gelu_reference(x: torch.Tensor) -> torch.Tensor:
    """tanh GELU written out by hand (the formula HF's NewGELUActivation uses)."""
    return 0.5 * x * (1.0 + torch.tanh((2.0 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3)))


def _count(gm: Any, name: str) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and name in str(n.target))


def test_training_graph_equals_peft_and_leaves_gm_alone(tmp_path: Path) -> None:
    from lora_fx.train.fast import training_graph

    base = tiny_gpt2()
    targets = ["c_attn", "c_fc"]
    gm = lora_fx.inject(base, (token_ids(),), lora_fx.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets))
    randomize_lora(gm, seed=5)
    layers = base.config.n_layer
    assert _count(gm, "aten.tanh") == layers
    train = training_graph(gm).eval()
    assert _count(train, "aten.gelu") == layers and _count(train, "aten.tanh") == 0
    assert _count(train, "lora_addmm") == len(lora_fx.branches(gm))
    assert _count(gm, "aten.tanh") == layers and _count(gm, "lora_addmm") == 0  # untouched
    ids = token_ids(3, 7, seed=8)
    pm = peft_model_like(base, gm, r=4, lora_alpha=8, target_modules=targets)
    torch.testing.assert_close(_logits(train(ids)), _logits(pm(ids)).detach(),
                               atol=1e-5, rtol=1e-5)
    # the copy trains gm's own parameters: same gradients as PEFT's A and B
    _logits(train(ids)).square().mean().backward()
    _logits(pm(ids)).square().mean().backward()
    peft_grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    for site, branch in lora_fx.branches(gm).items():
        for ours, key in ((branch.lora_A.weight, "lora_A"), (branch.lora_B.weight, "lora_B")):
            want = next(g for n, g in peft_grads.items() if f"{site}.{key}." in n)
            assert ours.grad is not None
            torch.testing.assert_close(ours.grad, want, atol=1e-5, rtol=1e-4)
    assert {id(p) for p in lora_fx.lora_parameters(train)} == \
        {id(p) for p in lora_fx.lora_parameters(gm)}


def test_fuse_gelu_pass_matches_only_the_formula() -> None:
    from lora_fx.passes.fuse_gelu import fuse_gelu_pass

    class Acts(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> Any:
            a = _gelu_reference(x)                                        # fused
            b = 0.5 * x * (1.0 + torch.tanh(0.79788456 * (x + 0.04 * x ** 3)))  # other const
            inner = torch.tanh((2.0 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3))
            c = 0.5 * x * (1.0 + inner)                                   # tanh reused below
            return a, b, c, inner

    x = torch.randn(4, 6)
    gm = torch.export.export(Acts(), (x,)).module()
    want = gm(x)
    fused = fuse_gelu_pass(gm)
    gm.recompile()
    assert fused.counts["fused_gelu"] == 1 and _count(gm, "aten.gelu") == 1
    for got, ref in zip(gm(x), want, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gm(x)[0], torch.nn.functional.gelu(x, approximate="tanh"))


# --- wide linears in column blocks (passes.wide_linear) ------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_blocked_linear_equals_linear_forward_and_grads(bias: bool) -> None:
    from lora_fx.passes.wide_linear import BLOCK, _BlockedLinear

    g = torch.Generator().manual_seed(0)
    n = 2 * BLOCK + 77  # two whole blocks and a partial one
    x = torch.randn(3, 5, 16, generator=g).requires_grad_(True)
    w = torch.randn(n, 16, generator=g).requires_grad_(True)
    b = torch.randn(n, generator=g).requires_grad_(True) if bias else None
    inputs = [x, w] + ([b] if b is not None else [])
    got = _BlockedLinear.apply(x, w, b)
    want = torch.nn.functional.linear(x, w, b)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    seed = torch.randn(want.shape, generator=g)
    for ours, ref in zip(torch.autograd.grad(got, inputs, seed),
                         torch.autograd.grad(want, inputs, seed), strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)


def test_wide_linear_measures_once_per_shape_and_follows_the_choice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_fx.passes import wide_linear as wl

    calls: list[tuple[int, ...]] = []
    monkeypatch.setattr(wl, "_choice", {})
    monkeypatch.setattr(wl, "_tune", lambda x, w, b: calls.append(tuple(w.shape)) or True)
    blocked: list[int] = []
    real = wl._blocked
    monkeypatch.setattr(wl, "_blocked", lambda x, w, b: blocked.append(1) or real(x, w, b))
    x, w = torch.randn(4, 8), torch.randn(wl.BLOCK + 3, 8)
    for _ in range(3):
        torch.testing.assert_close(wl.wide_linear(x, w), x @ w.t())
    assert calls == [(wl.BLOCK + 3, 8)] and len(blocked) == 3
    monkeypatch.setattr(wl, "_choice", {})
    monkeypatch.setattr(wl, "_tune", lambda x, w, b: False)
    wl.wide_linear(x, w)
    assert len(blocked) == 3  # measured slower: the plain linear runs


@pytest.mark.parametrize("use_blocks", [True, False])
def test_training_graph_routes_the_lm_head_and_equals_peft(
        monkeypatch: pytest.MonkeyPatch, use_blocks: bool) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from lora_fx.passes import wide_linear as wl
    from lora_fx.train.fast import training_graph

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
    assert _count(train, "wide_linear") == 1 and _count(gm, "wide_linear") == 0
    ids = token_ids(2, 9, seed=4)
    pm = peft_model_like(base, gm, r=4, lora_alpha=8, target_modules=targets)
    ours, ref = _logits(train(ids)), _logits(pm(ids))
    torch.testing.assert_close(ours, ref.detach(), atol=1e-5, rtol=1e-5)
    assert len(wl._choice) == 1
    ours.square().sum().backward()  # a sum: gradients of order 1, so rtol decides
    ref.square().sum().backward()
    peft_grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    for site, branch in lora_fx.branches(gm).items():
        want = next(g for n, g in peft_grads.items() if f"{site}.lora_B." in n)
        assert branch.lora_B.weight.grad is not None
        torch.testing.assert_close(branch.lora_B.weight.grad, want, atol=1e-4, rtol=1e-4)
