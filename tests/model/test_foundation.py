"""Core semantics on plain PyTorch models: identity at start, hand-written merges of functional
projections, training touches only A and B, dropout follows train()/eval(), refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from lora_fx.api import export_onnx
from lora_fx.graph.state import NODE_KEY, require_state
from tests.helpers import randomize_lora, tiny_gpt2, tiny_mlp, token_ids

ALL = ["w_in", "w_mid", "w_up", "head"]


@pytest.mark.parametrize("method", ["symbolic_trace", "export"])
def test_identity_at_start(method: str) -> None:
    model, ex = tiny_mlp()
    base = lora_fx.capture(model, ex, method=method)
    gm = lora_fx.inject(base, ex, lora_fx.LoraConfig(r=4, target_modules=ALL))
    with torch.no_grad():
        assert torch.equal(gm(*ex), model(*ex))


def test_identity_at_start_hf_gpt2() -> None:
    model = tiny_gpt2()
    ids = token_ids()
    gm = lora_fx.inject(model, (ids,), lora_fx.LoraConfig(r=4, target_modules=["c_attn"]))
    gm.eval()
    with torch.no_grad():
        assert torch.equal(gm(ids).logits, model(ids).logits)


def _hand_forward(model: nn.Module, x: torch.Tensor, ab: dict[str, Any], s: float
                  ) -> torch.Tensor:
    """The tiny MLP with hand-merged weights: W' = W + s·B@A ([out, in]); (s·B@A)ᵀ for [in, out]."""
    def d(name: str) -> torch.Tensor:
        a, b = ab[name]
        return s * (b @ a)

    w_in = model.w_in + d("w_in")
    w_mid = model.w_mid + d("w_mid")
    w_up = model.w_up + d("w_up").t()
    head = model.head.weight + d("head")
    h = F.gelu(x @ w_in.t() + model.b_in)
    h = F.gelu(h @ w_mid.t())
    h = h @ w_up
    return h @ head.t() + model.head.bias


@pytest.mark.parametrize("method", ["symbolic_trace", "export"])
def test_functional_forms_equal_hand_merge(method: str, tmp_path: Path) -> None:
    model, ex = tiny_mlp()
    base = lora_fx.capture(model, ex, method=method)
    gm = lora_fx.inject(base, ex, lora_fx.LoraConfig(r=3, lora_alpha=6, target_modules=ALL))
    randomize_lora(gm, seed=4, scale=0.3)
    forms = {n: r.form for n, r in require_state(gm).sites.items()}
    want = {"F.linear", "matmul"} | ({"nn.Linear"} if method == "symbolic_trace" else set())
    assert set(forms.values()) == want
    ab = {n: (b.lora_A.weight.detach(), b.lora_B.weight.detach())
          for n, b in lora_fx.branches(gm).items()}
    x = torch.randn(5, 32)
    with torch.no_grad():
        want = _hand_forward(model, x, ab, 2.0)
        torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-5)
        merged = lora_fx.merge(gm)
        torch.testing.assert_close(merged(x), want, rtol=1e-5, atol=1e-5)
    report = export_onnx(gm, ex, tmp_path / "m.onnx")
    base_report = export_onnx(base, ex, tmp_path / "b.onnx")
    assert report.op_histogram == base_report.op_histogram
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert abs(got - want.numpy()).max() < 1e-4


def test_merge_does_not_touch_model_or_injected_graph() -> None:
    model, ex = tiny_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = lora_fx.inject(model, ex, lora_fx.LoraConfig(r=2, target_modules=ALL))
    randomize_lora(gm)
    with torch.no_grad():
        y = gm(*ex)
        merged = lora_fx.merge(gm)
        twice = lora_fx.merge(merged)  # merging a merged graph is a no-op
        torch.testing.assert_close(twice(*ex), merged(*ex))
        torch.testing.assert_close(gm(*ex), y)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not [n for n in merged.graph.nodes if NODE_KEY in n.meta]


def test_one_step_changes_only_a_and_b() -> None:
    model = tiny_gpt2()
    ids = token_ids()
    gm = lora_fx.inject(model, (ids,), lora_fx.LoraConfig(r=4, target_modules=["c_attn", "c_fc"]))
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    opt = torch.optim.AdamW(lora_fx.lora_parameters(gm), lr=1e-2)
    gm.train()
    loss = gm(ids).logits.square().mean()
    loss.backward()
    opt.step()
    changed = {n for n, p in gm.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any(".lora_B." in n for n in changed)  # B leaves zero after a step
    assert all(p.grad is None for n, p in gm.named_parameters() if n not in trainable)


def test_dropout_follows_train_and_eval() -> None:
    model, ex = tiny_mlp()
    gm = lora_fx.inject(model, ex, lora_fx.LoraConfig(r=4, target_modules=["w_in"],
                                                      lora_dropout=0.5))
    randomize_lora(gm)
    gm.eval()
    with torch.no_grad():
        assert torch.equal(gm(*ex), gm(*ex))
        gm.train()
        torch.manual_seed(0)
        a = gm(*ex)
        torch.manual_seed(1)
        assert not torch.equal(a, gm(*ex))


def test_base_dropout_of_exported_model_follows_mode() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4,
                                 intermediate_size=64, vocab_size=97,
                                 max_position_embeddings=32)).eval()
    ids = token_ids()
    gm = lora_fx.capture(model, (ids,))
    assert any(isinstance(m, nn.Dropout) for m in gm.modules())
    gm.train()
    torch.manual_seed(0)
    a = gm(ids).last_hidden_state
    torch.manual_seed(1)
    assert not torch.equal(a, gm(ids).last_hidden_state)
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(ids).last_hidden_state, model(ids).last_hidden_state)


def test_inject_twice_is_refused() -> None:
    model, ex = tiny_mlp()
    gm = lora_fx.inject(model, ex, lora_fx.LoraConfig(r=2, target_modules=["w_in"]))
    with pytest.raises(lora_fx.LoraFxError, match="already has LoRA"):
        lora_fx.inject(gm, ex, lora_fx.LoraConfig(r=2, target_modules=["w_mid"]))


def test_target_matching_nothing_lists_closest() -> None:
    model, ex = tiny_mlp()
    with pytest.raises(lora_fx.LoraFxError, match="closest: w_in"):
        lora_fx.inject(model, ex, lora_fx.LoraConfig(r=2, target_modules=["w_inn"]))


def test_regex_and_suffix_targeting() -> None:
    model = tiny_gpt2()
    ids = token_ids()
    cfg = lora_fx.LoraConfig(r=2, target_modules=r"transformer\.h\.1\.attn\.c_.*")
    gm = lora_fx.inject(model, (ids,), cfg)
    assert sorted(require_state(gm).sites) == ["transformer.h.1.attn.c_attn",
                                                           "transformer.h.1.attn.c_proj"]
    with pytest.raises(lora_fx.LoraFxError):
        lora_fx.inject(model, (ids,), lora_fx.LoraConfig(r=2, target_modules=["attn.c"]))


def test_init_variants() -> None:
    model, ex = tiny_mlp()
    for init, b_zero in ((True, True), ("gaussian", True), (False, False)):
        gm = lora_fx.inject(model, ex, lora_fx.LoraConfig(r=4, target_modules=["w_in"],
                                                          init_lora_weights=init))
        b = lora_fx.branches(gm)["w_in"]
        assert bool((b.lora_B.weight == 0).all()) == b_zero
        assert not bool((b.lora_A.weight == 0).all())
