"""Tied weights: a LoRA on one use of a shared tensor changes that use only, unmerged and merged
(the merge unties: the targeted use reads its own W + ΔW), in PyTorch and in ONNX."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import lora_fx
from lora_fx.match.matcher import find_sites
from tests.helpers import (
    check_merged_onnx,
    factors,
    lora_scale,
    peft_model_like,
    randomize_lora,
    tiny_gpt2,
    token_ids,
)


class TiedLM(nn.Module):
    """emb → body → head, head.weight IS emb.weight; returns (logits, embedding output)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.emb(ids)
        return self.head(torch.tanh(self.body(e))), e


IDS = torch.tensor([[1, 5, 19, 0], [7, 7, 2, 11]])
S = lora_scale(4, 2)  # every test here: r = 2, lora_alpha = 4


def hand_reference(model: TiedLM, gm: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """logits through W + s·B A for the head only (nn.Linear: W [out, in]); the embedding reads
    W (+ its own LoRA: s·Aᵀ[ids] Bᵀ)."""
    w = model.emb.weight.detach()
    branches = lora_fx.branches(gm)
    e = w[ids]
    if "emb" in branches:
        a, b = factors(gm, "emb")
        e = e + S * (a.T[ids] @ b.T)
    a, b = factors(gm, "head")
    head_w = w + S * (b @ a)
    return torch.tanh(model.body(e)) @ head_w.T, e


@pytest.mark.parametrize("method", ["symbolic_trace", "export"])
def test_tied_uses_are_named_by_their_modules(method: str) -> None:
    gm = lora_fx.capture(TiedLM().eval(), (IDS,), method=method)
    sites = {s.name: s for s in find_sites(gm)[0]}
    assert sites["emb"].kind == "embedding" and sites["head"].kind == "linear"
    assert sites["emb"].shared and sites["head"].shared  # each knows the other reads W


@pytest.mark.parametrize("targets", [["head"], ["head", "emb"]])
@pytest.mark.parametrize("method", ["symbolic_trace", "export"])
def test_lora_on_the_head_leaves_the_embedding_alone(method: str, targets: list[str]) -> None:
    model = TiedLM().eval()
    before = model.emb.weight.detach().clone()
    gm = lora_fx.inject(lora_fx.capture(model, (IDS,), method=method), (IDS,),
                        lora_fx.LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    randomize_lora(gm, seed=2, scale=0.3)
    merged = lora_fx.merge(gm)
    with torch.no_grad():
        logits_ref, emb_ref = hand_reference(model, gm, IDS)
        for out in (gm(IDS), merged(IDS)):
            torch.testing.assert_close(out[0], logits_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out[1], emb_ref, rtol=1e-5, atol=1e-5)
        if targets == ["head"]:
            assert torch.equal(merged(IDS)[1], model(IDS)[1])  # embedding output: unchanged
    assert torch.equal(model.emb.weight, before) and model.head.weight is model.emb.weight


@pytest.fixture(scope="module")
def tied_onnx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    model = TiedLM().eval()
    gm = lora_fx.inject(model, (IDS,), lora_fx.LoraConfig(r=2, lora_alpha=4,
                                                         target_modules=["head"]))
    randomize_lora(gm, seed=3, scale=0.3)
    with torch.no_grad():
        want = hand_reference(model, gm, IDS)
    out = tmp_path_factory.mktemp("tied")
    onnx_out = check_merged_onnx(gm, lora_fx.capture(model, (IDS,)), (IDS,), want, out)
    return {"model": model, "gm": gm, **onnx_out}


def test_tied_merged_onnx_keeps_the_embedding_output(tied_onnx: dict[str, Any]) -> None:
    """ORT's embedding output == the base model's; logits == hand reference (fixture)."""
    with torch.no_grad():
        base_emb = tied_onnx["model"](IDS)[1]
    torch.testing.assert_close(tied_onnx["onnx_got"][1], base_emb, rtol=0, atol=1e-6)
    assert tied_onnx["onnx_merged"].op_histogram == tied_onnx["onnx_base"].op_histogram


def _initializers(path: Path) -> dict[tuple[int, ...], torch.Tensor]:
    model = onnx.load(str(path))
    return {tuple(t.dims): torch.from_numpy(numpy_helper.to_array(t).copy())
            for t in model.graph.initializer}


def test_untied_merge_keeps_the_initializer_count(tied_onnx: dict[str, Any]) -> None:
    """What is true of the optimized export: the base file already holds the tied W twice (W
    [20, 8] for Gather, Wᵀ [8, 20] folded for MatMul), so the untied merge adds no initializer;
    Gather keeps W, MatMul reads (W + s·B A)ᵀ."""
    base = _initializers(tied_onnx["onnx_base"].path)
    merged = _initializers(tied_onnx["onnx_merged"].path)
    assert sorted(base) == sorted(merged)
    w = tied_onnx["model"].emb.weight.detach()
    a, b = factors(tied_onnx["gm"], "head")
    assert torch.equal(base[(20, 8)], w) and torch.equal(merged[(20, 8)], w)
    torch.testing.assert_close(base[(8, 20)], w.T)
    torch.testing.assert_close(merged[(8, 20)], (w + S * (b @ a)).T, rtol=1e-6, atol=1e-6)


def test_gpt2_lm_head_lora_equals_peft_and_unties_on_merge() -> None:
    base = tiny_gpt2()
    ids = token_ids()
    before = base.transformer.wte.weight.detach().clone()
    gm = lora_fx.inject(base, (ids,), lora_fx.LoraConfig(r=2, lora_alpha=4,
                                                        target_modules=["lm_head"]))
    assert list(lora_fx.branches(gm)) == ["lm_head"]
    randomize_lora(gm, seed=4, scale=0.3)
    ref = peft_model_like(base, gm, r=2, lora_alpha=4, target_modules=["lm_head"])
    merged = lora_fx.merge(gm)
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(gm(ids)["logits"], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(ids)["logits"], want, rtol=1e-5, atol=1e-5)
    wte = base.transformer.wte.weight
    tensors = {id(p): n for n, p in merged.named_parameters(remove_duplicate=False)}
    assert id(wte) in tensors  # the embedding still reads the original, unchanged tensor
    assert base.lm_head.weight is wte and torch.equal(wte, before)  # user's model untouched
