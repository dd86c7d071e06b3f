"""The injected and merged models are called like the model (issue 19, group 1), against PEFT.

``model(**batch)`` with labels gives PEFT's loss, ``transformers.Trainer`` trains the injected
model with plain ``TrainingArguments``, ``generate()`` gives PEFT's greedy tokens.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx.errors import LoraFxError
from tests.helpers import peft_model_like, randomize_lora

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")


def _llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=97, max_position_embeddings=64, use_cache=False,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        initializer_range=0.3)  # clear margins between the top tokens
    return transformers.LlamaForCausalLM(cfg).eval()


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=64,
                                  use_cache=False, bos_token_id=0, eos_token_id=0,
                                  initializer_range=0.3)
    return transformers.GPT2LMHeadModel(cfg).eval()


FAMILIES: dict[str, tuple[Any, dict[str, Any]]] = {
    "llama": (_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2": (_gpt2, dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
}


def _ids(batch: int = 2, seq: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _inject(family: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(base model, injected model with random A and B, PEFT's model with the same A and B),
    injected from positional example inputs as a model file gives them."""
    build, targets = FAMILIES[family]
    base = build()
    ids = _ids()
    mask = torch.ones_like(ids)
    example = (ids, mask) if family == "llama" else (ids, None, mask)
    cfg = dict(r=4, lora_alpha=8, **targets)
    gm = lora_fx.inject(base, example, lora_fx.LoraConfig(**cfg))
    randomize_lora(gm, seed=2, scale=0.5)
    return base, gm, peft_model_like(base, gm, **cfg)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_keyword_call_with_labels_gives_peft_loss(family: str) -> None:
    base, gm, pm = _inject(family)
    ids = _ids(3, 11, seed=5)  # another batch and length than the example's
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    out, ref = gm(**batch), pm(**batch)
    assert type(out) is type(ref)  # the model's output type: .loss, .logits
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.logits, base(input_ids=ids).logits, atol=1e-3)  # LoRA acts
    out.loss.backward()  # the loss trains the adapter: A and B get gradients, W does not
    assert all(p.grad is not None for p in lora_fx.lora_parameters(gm))
    assert all(p.grad is None for n, p in gm.named_parameters() if "lora" not in n)
    # positional calls and calls without labels still run the captured graph
    no_labels = gm(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert no_labels.loss is None
    torch.testing.assert_close(no_labels.logits, ref.logits, atol=1e-5, rtol=1e-5)
    assert gm.config.to_dict() == base.config.to_dict()  # the model's config (its skeleton's)
    assert "labels" in inspect.signature(gm.forward).parameters


def test_keyword_the_capture_did_not_see_is_used_not_dropped() -> None:
    """BERT injected without token_type_ids: a call with them computes with them (PEFT's)."""
    torch.manual_seed(0)
    base = transformers.BertModel(transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
        vocab_size=97, max_position_embeddings=32, initializer_range=0.3)).eval()
    ids = _ids()
    cfg = dict(r=4, lora_alpha=8, target_modules=["query", "value"])
    gm = lora_fx.inject(base, (ids, torch.ones_like(ids)), lora_fx.LoraConfig(**cfg))
    randomize_lora(gm, seed=3, scale=0.5)
    pm = peft_model_like(base, gm, **cfg)
    types = (torch.arange(8) >= 4).long().expand(2, 8)
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": types}
    out, ref = gm(**kw), pm(**kw)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=1e-5, rtol=1e-5)
    without = gm(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert not torch.allclose(without, out.last_hidden_state, atol=1e-3)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_gives_peft_tokens(family: str) -> None:
    base, gm, pm = _inject(family)
    prompt = _ids(2, 5, seed=7)
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
              pad_token_id=0)
    ours = gm.generate(prompt, **kw)
    theirs = pm.generate(input_ids=prompt, **kw)
    assert ours.shape == (2, 11)
    assert torch.equal(ours, theirs), (ours, theirs)
    assert not torch.equal(ours, base.generate(prompt, **kw))  # LoRA changed the tokens
    assert "forward" not in base.__dict__  # generate's routing is undone
    merged = lora_fx.merge(gm)
    assert torch.equal(merged.generate(prompt, **kw), theirs)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_runs_with_the_kv_cache(family: str) -> None:
    """Every branch hooks onto the module it wraps, so HF's generate keeps its cache (a
    returned past_key_values) and still gives PEFT's tokens, injected and merged."""
    base, gm, pm = _inject(family)
    prompt = _ids(2, 5, seed=8)
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
              pad_token_id=0, use_cache=True, return_dict_in_generate=True)
    theirs = pm.generate(input_ids=prompt, **kw)
    for model in (gm, lora_fx.merge(gm)):
        ours = model.generate(prompt, **kw)
        assert ours.past_key_values is not None and ours.past_key_values.get_seq_length() == 12
        assert torch.equal(ours.sequences, theirs.sequences)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_after_a_cast_gives_peft_tokens(family: str) -> None:
    """``.to(torch.bfloat16)``: the hooked branches run in the cast model as PEFT's layers do
    (fp32 factors cast to bf16 with the model), so the bf16 tokens are PEFT's bf16 tokens."""
    base, gm, pm = _inject(family)
    gm.to(torch.bfloat16)
    pm.to(torch.bfloat16)
    prompt = _ids(2, 5, seed=7)
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
              pad_token_id=0, use_cache=True)
    assert torch.equal(gm.generate(prompt, **kw), pm.generate(input_ids=prompt, **kw))


@pytest.mark.parametrize("extra", [{"modules_to_save": ["lm_head"]}, {"use_dora": True}])
def test_generate_of_a_peft_adapter_gives_peft_tokens(extra: dict[str, Any],
                                                      tmp_path: Path) -> None:
    """A trained PEFT adapter (A, B, and the head copy or DoRA's m moved off their init)
    loaded by lorafx generates PEFT's tokens with the cache (DoRA's branch hooks on with the
    module's W and b)."""
    import peft

    base = _llama()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **extra))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2 * (p.abs().mean() + 0.1))
    pm.save_pretrained(str(tmp_path / "a"))
    gm = lora_fx.load_adapter(base, (_ids(),), tmp_path / "a")
    prompt = _ids(2, 5, seed=9)
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
              pad_token_id=0, use_cache=True, return_dict_in_generate=True)
    ours, theirs = gm.generate(prompt, **kw), pm.eval().generate(input_ids=prompt, **kw)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert not torch.equal(ours.sequences, base.generate(prompt, **kw).sequences)
    assert ours.past_key_values is not None


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_hand_written_decode_loop_with_a_cache_gives_peft_logits(family: str) -> None:
    """``model(ids, use_cache=True)`` then ``model(next, cache=...)``: calls a graph cannot
    serve (a cache out, then in) run the eager model with the branches hooked on, so each
    step's logits are PEFT's; after ``.to()`` the hooked model follows the new tensors."""
    base, gm, pm = _inject(family)
    ids = _ids(2, 6, seed=3)
    ours, theirs = gm(input_ids=ids, use_cache=True), pm(input_ids=ids, use_cache=True)
    for _ in range(4):
        torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=1e-5)
        nxt = theirs.logits[:, -1:].argmax(-1)
        ours = gm(input_ids=nxt, cache=ours.past_key_values, use_cache=True)
        theirs = pm(input_ids=nxt, cache=theirs.past_key_values, use_cache=True)
    assert ours.past_key_values.get_seq_length() == 10
    assert not torch.allclose(ours.logits, base(input_ids=ids).logits[:, -1:], atol=1e-3)
    # the hooks live on the hooked model's own copies: no other view of the model has them
    assert not any(m._forward_hooks for m in gm.origin_model().modules())
    assert not any(m._forward_hooks for m in base.modules())
    gm.to(torch.float64)
    assert gm(input_ids=ids, use_cache=True).logits.dtype == torch.float64


def test_generate_without_hooks_runs_the_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a branch has no module to hook onto, generate() runs each step through the graph
    without a cache, and still gives PEFT's tokens."""
    from lora_fx.model import wrapper

    base, gm, pm = _inject("llama")
    monkeypatch.setattr(wrapper, "plan_hooks", lambda *_: None)
    prompt = _ids(2, 5, seed=7)
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
              pad_token_id=0, use_cache=True, return_dict_in_generate=True)
    ours, theirs = gm.generate(prompt, **kw), pm.generate(input_ids=prompt, **kw)
    assert ours.past_key_values is None and torch.equal(ours.sequences, theirs.sequences)
    assert "forward" not in base.__dict__


def test_a_functional_site_has_no_hook() -> None:
    """x @ W.T in model code is a site with no module to hook onto: plan_hooks says so."""
    from lora_fx.model.eager_lora import plan_hooks

    class Proj(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 4))
            self.lin = nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x @ self.w.T)

    from lora_fx.capture.trace import capture

    x = torch.randn(2, 3, 4)
    model = capture(Proj(), (x,), method="export")  # keeps the eager model, as HF captures do
    only_lin = lora_fx.inject(model, (x,), lora_fx.LoraConfig(r=2, target_modules=["lin"]))
    both = lora_fx.inject(model, (x,), lora_fx.LoraConfig(r=2, target_modules=["lin", "w"]))
    assert set(lora_fx.branches(both)) == {"lin", "w"}
    assert plan_hooks(only_lin, only_lin.origin_model()) is not None
    assert plan_hooks(both, both.origin_model()) is None
    with pytest.raises(LoraFxError, match="not a module's call.*use_cache=False"):
        both.hooked_model("a call with a cache")


def test_merged_model_is_called_like_the_model() -> None:
    base, gm, pm = _inject("llama")
    merged = lora_fx.merge(gm)
    assert isinstance(merged, torch.fx.GraphModule) and merged.config.vocab_size == 97
    ids = _ids(3, 9, seed=4)
    out = merged(input_ids=ids, labels=ids)
    ref = pm(input_ids=ids, labels=ids)
    # W' = W + s·B@A rounds once in fp32: logits of size ~10 agree to ~1e-5 relative
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=1e-5)


def test_a_call_that_does_not_bind_is_one_line() -> None:
    _, gm, _ = _inject("llama")
    with pytest.raises(LoraFxError, match="LlamaForCausalLM: keyword argument 'input' is a "
                                          "tensor.*did you mean input_ids"):
        gm(input=_ids())
    with pytest.raises(LoraFxError, match="LlamaForCausalLM: multiple values for "
                                          "argument 'input_ids'; it takes input_ids"):
        gm(_ids(), input_ids=_ids())


def test_trainer_trains_the_injected_model_with_plain_arguments(tmp_path: Path) -> None:
    """transformers.Trainer, plain TrainingArguments, model(**batch) computing the loss."""
    pytest.importorskip("accelerate")
    base, gm, _ = _inject("gpt2")
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": i, "attention_mask": torch.ones(8, dtype=torch.long), "labels": i}
            for i in torch.randint(1, 97, (16, 8), generator=g)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6,
                                          per_device_train_batch_size=4, learning_rate=1e-2,
                                          report_to="none", use_cpu=True, logging_steps=1)
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    reference = copy.deepcopy(base)
    trainer = transformers.Trainer(model=gm, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    for name, p in gm.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == (".lora_A." in name or ".lora_B." in name), name
    # the trained adapter is what PEFT loads
    gm.save_pretrained(tmp_path / "adapter")
    from peft import PeftModel
    pm = PeftModel.from_pretrained(reference, str(tmp_path / "adapter")).eval()
    ids = _ids(2, 8, seed=9)
    torch.testing.assert_close(gm.eval()(input_ids=ids).logits, pm(input_ids=ids).logits,
                               atol=1e-5, rtol=1e-5)


def test_trainer_gradient_accumulation_gives_peft_weights(tmp_path: Path) -> None:
    """With gradient accumulation Trainer passes ``num_items_in_batch`` (a tensor, through
    **kwargs) so the loss is summed over the accumulated batch's tokens, not averaged per
    micro-batch; lorafx takes it as a graph input, so plain SGD on micro-batches with unequal
    numbers of labelled tokens ends at PEFT's weights (and logs PEFT's losses)."""
    pytest.importorskip("accelerate")
    base, gm, pm = _inject("llama")
    g = torch.Generator().manual_seed(5)
    data = []
    for i in torch.randint(1, 97, (16, 8), generator=g):
        labels = i.clone()
        labels[: int(torch.randint(0, 7, (), generator=g))] = -100  # unequal counts per row
        data.append({"input_ids": i, "attention_mask": torch.ones(8, dtype=torch.long),
                     "labels": labels})
    trained = []
    for model in (gm.train(), pm.train()):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(len(trained))), max_steps=3, seed=0,
            per_device_train_batch_size=2, gradient_accumulation_steps=2, optim="sgd",
            learning_rate=0.5, report_to="none", use_cpu=True, logging_steps=1)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        trained.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert trained[0] == pytest.approx(trained[1], rel=1e-5)
    theirs = dict(pm.named_parameters())
    for name, b in lora_fx.branches(gm).items():
        for f in ("lora_A", "lora_B"):
            want = theirs[f"base_model.model.{name}.{f}.default.weight"]
            torch.testing.assert_close(getattr(b, f).weight, want, atol=1e-6, rtol=1e-5)

