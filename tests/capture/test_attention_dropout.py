"""Attention dropout survives capture: the graph in train() draws the same attention dropout as
the model's own code under the same seed, and in eval() (so in every export) it is unchanged."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import lora_fx
from lora_fx.capture.attention_dropout import PREFIX, AttentionDropoutP
from lora_fx.onnx.verify import flat_outputs
from tests.helpers import peft_model_like, randomize_lora, token_ids


def _gpt2(p: float) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)  # only attention dropout: the other dropouts would draw numbers too
    return GPT2LMHeadModel(GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=32, use_cache=False,
        attn_pdrop=p, resid_pdrop=0.0, embd_pdrop=0.0)).eval()


def _bert(p: float) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
        vocab_size=97, max_position_embeddings=32, attention_probs_dropout_prob=p,
        hidden_dropout_prob=0.0), add_pooling_layer=False).eval()


def _llama(p: float) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=97, max_position_embeddings=32, use_cache=False,
        attention_dropout=p)).eval()


def _seeded(model: Any, ids: torch.Tensor, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return [t.detach() for t in flat_outputs(model(ids))]


@pytest.mark.parametrize("make,targets", [(_gpt2, ["c_attn"]), (_bert, ["query", "value"]),
                                          (_llama, ["q_proj", "v_proj"])])
def test_train_mode_draws_the_models_attention_dropout(make: Any, targets: list[str]) -> None:
    base = make(0.3)
    ids = token_ids()
    gm = lora_fx.inject(base, (ids,), lora_fx.LoraConfig(r=4, target_modules=targets))
    randomize_lora(gm, seed=2)
    layers = sum(isinstance(m, AttentionDropoutP) for m in gm.modules())
    assert layers == 2 and all(m.p == pytest.approx(0.3) for m in gm.modules()
                               if isinstance(m, AttentionDropoutP))
    peft = peft_model_like(base, gm, r=4, target_modules=targets)
    gm.train()
    peft.train()
    for seed in (0, 1):  # PEFT's model in train mode runs HF's code: the same RNG draws
        want = _seeded(peft, ids, seed)
        got = _seeded(gm, ids, seed)
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_seeded(gm, ids, 0)[0], _seeded(gm, ids, 1)[0])  # it is random
    gm.eval()
    peft.eval()
    torch.testing.assert_close(_seeded(gm, ids, 0)[0], _seeded(peft, ids, 0)[0],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_seeded(gm, ids, 0)[0], _seeded(gm, ids, 1)[0])  # deterministic


def test_no_dropout_configured_adds_nothing() -> None:
    base = _gpt2(0.0)
    ids = token_ids()
    gm = lora_fx.inject(base, (ids,), lora_fx.LoraConfig(r=4, target_modules=["c_attn"]))
    assert not any(n.op == "call_module" and str(n.target).startswith(PREFIX)
                   for n in gm.graph.nodes)


def test_merged_export_with_attention_dropout_equals_base_graph(tmp_path: Any) -> None:
    """The dropout_p feeder is identity-like for export: the merged file is the base graph and
    the export still reuses the captured program."""
    from lora_fx.capture.program import captured_program

    base = _gpt2(0.3)
    ids = token_ids()
    gm = lora_fx.inject(base, (ids,), lora_fx.LoraConfig(r=4, target_modules=["c_attn"]))
    randomize_lora(gm, seed=3)
    assert captured_program(lora_fx.merge(gm)) is not None
    merged = lora_fx.export_onnx(gm, (ids,), tmp_path / "m.onnx")
    plain = lora_fx.export_onnx(lora_fx.capture(base, (ids,)), (ids,), tmp_path / "b.onnx")
    assert merged.op_histogram == plain.op_histogram
    assert merged.max_abs_diff is not None and merged.max_abs_diff <= 1e-4
