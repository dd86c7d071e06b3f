"""LoRA on nn.Embedding / aten.embedding with PEFT's keys and math: forward and gradients equal
PEFT's, adapters both ways, merged ONNX == PEFT with the base op histogram."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lora_fx
from lora_fx.errors import LoraFxError
from tests.helpers import saved_and_checked


class Tagger(nn.Module):
    """Token embedding (padding_idx 0) + position embedding → linear head."""

    def __init__(self, max_norm: float | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(30, 8, padding_idx=0, max_norm=max_norm)
        self.pos = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.head(torch.tanh(self.tok(ids) + self.pos(positions)))


IDS = torch.tensor([[0, 4, 29, 7, 0], [3, 3, 1, 12, 9]])
CFG = dict(r=3, lora_alpha=6, target_modules=["tok", "pos", "head"])


@pytest.fixture(scope="module")
def tagger(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = Tagger().eval()
    out = tmp_path_factory.mktemp("emb")
    return {"model": base, "dir": out, **saved_and_checked(base, (IDS,), CFG, seed=8, out=out)}


def test_embedding_keys_are_peft_keys(tagger: dict[str, Any]) -> None:
    state = load_file(str(tagger["dir"] / "adapter" / "adapter_model.safetensors"))
    shapes = {k.removeprefix("base_model.model."): tuple(v.shape) for k, v in state.items()}
    assert shapes == {"tok.lora_embedding_A": (3, 30), "tok.lora_embedding_B": (8, 3),
                      "pos.lora_embedding_A": (3, 16), "pos.lora_embedding_B": (8, 3),
                      "head.lora_A.weight": (3, 8), "head.lora_B.weight": (5, 3)}


def test_embedding_injected_and_merged_equal_peft(tagger: dict[str, Any]) -> None:
    ids = torch.tensor([[5, 0, 2], [29, 28, 0]])  # another batch: the capture is dynamic
    with torch.no_grad():
        want = tagger["peft"](ids)
        torch.testing.assert_close(tagger["gm"](ids), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lora_fx.merge(tagger["gm"])(ids), want, rtol=1e-5, atol=1e-5)
        assert (want - tagger["model"](ids)).abs().max() > 1e-3


def test_embedding_merged_onnx_equals_peft(tagger: dict[str, Any]) -> None:
    """ORT == PEFT within 1e-4 and histogram == base (asserted in check_merged_onnx)."""
    assert tagger["onnx_merged"].op_histogram == tagger["onnx_base"].op_histogram
    assert tagger["onnx_merged"].op_histogram["ai.onnx::Gather"] >= 2


def test_embedding_gradients_equal_peft(tagger: dict[str, Any]) -> None:
    """One training step's gradients match PEFT's (padding_idx column of A gets none)."""
    gm, ref = copy.deepcopy(tagger["gm"]), copy.deepcopy(tagger["peft"])
    for name, p in ref.named_parameters():  # loaded for inference: make its LoRA trainable
        p.requires_grad_("lora_" in name)
    gm(IDS).square().sum().backward()
    ref(IDS).square().sum().backward()
    ours = gm.get_submodule("lora.tok").lora_A.weight.grad
    theirs = ref.base_model.model.tok.lora_embedding_A["default"].grad
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert ours[:, 0].abs().max() == 0 and ours.abs().max() > 0


def test_peft_embedding_adapter_loads_in_lorafx(tagger: dict[str, Any], tmp_path: Path) -> None:
    torch.manual_seed(9)
    pm = peft.get_peft_model(copy.deepcopy(tagger["model"]),
                             peft.LoraConfig(init_lora_weights=False, **CFG))
    pm.save_pretrained(tmp_path / "p")
    gm = lora_fx.load_adapter(tagger["model"], (IDS,), tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(gm(IDS), pm.eval()(IDS), rtol=1e-5, atol=1e-5)


def test_fresh_embedding_branch_is_identity() -> None:
    """PEFT's init: A = 0, B ~ N(0, 1): the injected model starts equal to the base."""
    model = Tagger().eval()
    gm = lora_fx.inject(model, (IDS,), lora_fx.LoraConfig(target_modules=["tok"]))
    with torch.no_grad():
        assert torch.equal(gm(IDS), model(IDS))


def test_max_norm_embedding_is_refused() -> None:
    with pytest.raises(LoraFxError, match="max_norm"):
        lora_fx.inject(Tagger(max_norm=1.0).eval(), (IDS,),
                       lora_fx.LoraConfig(target_modules=["tok"]))
