"""Targeting as PEFT users expect: "all-linear", exclude_modules, layers_to_transform and
layers_pattern choose the same modules as PEFT; target_forms (lorafx only) picks by op form and
never reaches PEFT's adapter_config.json."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

import lora_fx
from lora_fx.errors import LoraFxError
from tests.helpers import randomize_lora, tiny_gpt2, token_ids


def peft_choice(model: nn.Module, **cfg: Any) -> set[str]:
    """The modules PEFT wraps for ``cfg``."""
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, **cfg))
    return {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
            if isinstance(m, BaseTunerLayer)}


def lorafx_choice(model: nn.Module, inputs: tuple[Any, ...], **cfg: Any) -> set[str]:
    _, chosen, _ = lora_fx.plan(model, inputs, lora_fx.LoraConfig(r=2, **cfg))
    return {s.name for s in chosen}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.v, self.mlp = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(torch.tanh(self.q(x) * self.v(x)))


class Stack(nn.Module):
    """model.layers.{0,1,2}.{q,v,mlp} → model.head; a functional projection and a conv."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(Block() for _ in range(3))
        self.model.head = nn.Linear(8, 4)
        self.proj = nn.Parameter(torch.randn(8, 8) * 0.3)
        self.conv = nn.Conv1d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.transpose(1, 2)).transpose(1, 2) + x @ self.proj
        for layer in self.model.layers:
            x = layer(x)
        return self.model.head(x)


X = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
CONFIGS = [
    dict(target_modules=["q", "v"], exclude_modules=["model.layers.1.q"]),
    dict(target_modules=r".*\.(q|v|mlp)", exclude_modules=r".*layers\.2\..*"),
    dict(target_modules=["q", "v", "mlp"], layers_to_transform=[0, 2]),
    dict(target_modules=["q", "v"], layers_to_transform=1, layers_pattern="layers"),
    dict(target_modules=["model.layers.0.q", "v"], layers_to_transform=[2]),
    dict(target_modules="all-linear", exclude_modules=["mlp"]),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: json.dumps(c)[:60])
def test_module_choice_equals_peft(cfg: dict[str, Any]) -> None:
    model = Stack().eval()
    ours = lorafx_choice(model, (X,), **cfg)
    linear_modules = peft_choice(model, **cfg)
    assert ours - {"proj"} == linear_modules  # proj: functional, beyond PEFT's reach
    assert ("proj" in ours) == (cfg["target_modules"] == "all-linear")


def test_layers_to_transform_with_a_regex_is_refused_as_peft() -> None:
    with pytest.raises(ValueError, match="layers_to_transform"):
        peft.LoraConfig(target_modules="all-linear", layers_to_transform=[1])
    with pytest.raises(LoraFxError, match="layers_to_transform cannot be used"):
        lora_fx.LoraConfig(target_modules="all-linear", layers_to_transform=[1])


def test_all_linear_keeps_functional_linears_and_leaves_conv_out() -> None:
    _, chosen, rest = lora_fx.plan(Stack().eval(), (X,), lora_fx.LoraConfig(
        target_modules="all-linear"))
    assert {s.name for s in chosen} == peft_choice(Stack(), target_modules="all-linear") | {
        "proj"}
    assert "model.head" in {s.name for s in chosen}  # a plain module has no output head (PEFT)
    reasons = {k.name: k.reason for k in rest}
    assert reasons["conv"] == "all-linear takes linear forms only, not conv"


def test_all_linear_on_gpt2_equals_peft_and_skips_the_head() -> None:
    base = tiny_gpt2()
    _, chosen, rest = lora_fx.plan(base, (token_ids(),), lora_fx.LoraConfig(
        target_modules="all-linear"))
    assert {s.name for s in chosen} == peft_choice(base, target_modules="all-linear")
    assert {k.name: k.reason for k in rest}["lm_head"].startswith("output head")


def test_all_linear_seq_cls_skips_the_classifier_as_peft() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(
        num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
        vocab_size=50, max_position_embeddings=16, num_labels=3)).eval()
    ids = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    cfg = dict(target_modules="all-linear", task_type="SEQ_CLS")
    ours = lorafx_choice(base, (ids,), **cfg)
    assert ours == peft_choice(base, **cfg) and "classifier" not in ours
    assert "classifier" in lorafx_choice(base, (ids,), target_modules="all-linear")


@pytest.mark.parametrize(("forms", "names", "want"), [
    (["conv"], None, {"conv"}),
    (["matmul"], None, {"proj"}),
    (["linear"], ["q", "proj"], {"proj", "model.layers.0.q", "model.layers.1.q",
                                 "model.layers.2.q"}),
    (["nn.Linear", "conv1d"], ["head", "conv", "proj"], {"model.head"}),
])
def test_target_forms_choose_by_form(forms: list[str], names: list[str] | None,
                                     want: set[str]) -> None:
    """Symbolic trace: conv and nn.Linear are call_module (forms nn.Conv1d, nn.Linear)."""
    ours = lorafx_choice(Stack().eval(), (X,), target_modules=names, target_forms=forms)
    assert ours == want


def test_unknown_form_is_refused_with_the_list() -> None:
    with pytest.raises(LoraFxError, match="unknown form 'dense'.*nn.Linear"):
        lorafx_choice(Stack().eval(), (X,), target_forms=["dense"])


def test_target_forms_stay_out_of_peft_config(tmp_path: Path) -> None:
    """Saved with target_forms: PEFT gets the explicit site list, loads it, computes the same."""
    model = Stack().eval()
    cfg = lora_fx.LoraConfig(r=2, target_forms=["nn.Linear", "nn.Conv1d"],
                             exclude_modules=["mlp"])
    gm = lora_fx.inject(model, (X,), cfg)
    randomize_lora(gm, seed=1, scale=0.3)
    lora_fx.save_adapter(gm, tmp_path / "a")
    data = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert "target_forms" not in data and "enable_lora" not in data
    assert not (tmp_path / "a" / "lorafx_config.json").exists()
    assert data["target_modules"] == sorted(lora_fx.branches(gm))
    assert "conv" in data["target_modules"] and "model.layers.0.mlp" not in data[
        "target_modules"]
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "a").eval()
    again = lora_fx.load_adapter(model, (X,), tmp_path / "a")
    with torch.no_grad():
        want = ref(X)
        torch.testing.assert_close(gm(X), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again(X), want, rtol=1e-5, atol=1e-5)


def test_functional_projection_saved_by_all_linear_is_named(tmp_path: Path) -> None:
    """all-linear is written as its explicit site list (as PEFT writes its expansion)."""
    model = Stack().eval()
    gm = lora_fx.inject(model, (X,), lora_fx.LoraConfig(r=2, target_modules="all-linear"))
    lora_fx.save_adapter(gm, tmp_path / "a")
    data = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert data["target_modules"] == sorted(lora_fx.branches(gm)) and "proj" in data[
        "target_modules"]


def test_functional_linear_in_a_module_of_its_own(tmp_path: Path) -> None:
    """peft_reachable says no for a weight read by F.linear outside nn.Linear.forward."""
    from lora_fx.match.matcher import find_sites
    from lora_fx.match.peft_reach import peft_reachable

    class Fn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) + F.linear(x, self.lin.weight.flip(0))

    sites = find_sites(lora_fx.capture(Fn().eval(), (X,)))[0]
    assert [(s.name, peft_reachable(s)) for s in sites] == [("lin", True)]
