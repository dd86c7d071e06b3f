"""Conv1d/2d/3d LoRA in PEFT's layout: PEFT parity, adapters both ways, geometry PEFT lacks,
grouped convs refused, merged ONNX == PEFT with the base op histogram."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import lora_fx
from lora_fx.errors import LoraFxError
from lora_fx.match.peft_reach import peft_reachable
from tests.helpers import factors, lora_scale, randomize_lora, saved_and_checked


class CNN(nn.Module):
    """Conv2d → Conv2d (stride 2) → Conv1d over rows → Conv3d on a reshaped volume."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.c3 = nn.Conv1d(8, 6, 3, padding=1)
        self.c4 = nn.Conv3d(1, 2, (1, 2, 2))
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c2(torch.relu(self.c1(x))))      # [B, 8, 4, 4]
        h = torch.relu(self.c3(h.flatten(2)))                 # [B, 6, 16]
        v = self.c4(h.unsqueeze(1).unflatten(-1, (4, 4)))     # [B, 2, 6, 3, 3]
        return self.head(v.mean((1, 3, 4)))


TARGETS = ["c1", "c2", "c3", "c4"]
X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = CNN().eval()
    cfg = dict(r=2, lora_alpha=5, target_modules=TARGETS)
    out = tmp_path_factory.mktemp("conv")
    return {"base": base, "cfg": cfg, "dir": out,
            **saved_and_checked(base, (X,), cfg, seed=4, out=out)}


def test_conv_sites_and_peft_layout(cnn: dict[str, Any]) -> None:
    state = load_file(str(cnn["dir"] / "adapter" / "adapter_model.safetensors"))
    shapes = {k.removeprefix("base_model.model."): tuple(v.shape) for k, v in state.items()}
    assert shapes["c1.lora_A.weight"] == (2, 3, 3, 3)
    assert shapes["c1.lora_B.weight"] == (8, 2, 1, 1)
    assert shapes["c3.lora_A.weight"] == (2, 8, 3)
    assert shapes["c4.lora_A.weight"] == (2, 1, 1, 2, 2)
    assert shapes["c4.lora_B.weight"] == (2, 2, 1, 1, 1)


def test_conv_injected_and_merged_equal_peft(cnn: dict[str, Any]) -> None:
    with torch.no_grad():
        ours, merged = cnn["gm"](X), lora_fx.merge(cnn["gm"])(X)
        plain = cnn["base"](X)
    torch.testing.assert_close(ours, cnn["want"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, cnn["want"], rtol=1e-5, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-3


def test_conv_merged_onnx_equals_peft(cnn: dict[str, Any]) -> None:
    """ORT == PEFT within 1e-4 and histogram == base (asserted in check_merged_onnx)."""
    assert cnn["onnx_merged"].op_histogram == cnn["onnx_base"].op_histogram
    assert cnn["onnx_merged"].op_histogram["ai.onnx::Conv"] == 4


def test_peft_conv_adapter_loads_in_lorafx(cnn: dict[str, Any], tmp_path: Path) -> None:
    torch.manual_seed(5)
    pm = peft.get_peft_model(copy.deepcopy(cnn["base"]),
                             peft.LoraConfig(init_lora_weights=False, **cnn["cfg"]))
    pm.save_pretrained(tmp_path / "p")
    gm = lora_fx.load_adapter(cnn["base"], (X,), tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(gm(X), pm.eval()(X), rtol=1e-5, atol=1e-5)


class Geometry(nn.Module):
    """Convs PEFT cannot adapt faithfully: dilation, reflect padding, functional."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.dil = nn.Conv2d(3, 4, 3, padding=2, dilation=2)
        self.refl = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.w = nn.Parameter(torch.randn(5, 4, 3, 3) * 0.2)
        self.dw = nn.Conv2d(5, 5, 3, groups=5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.refl(torch.tanh(self.dil(x)))
        return self.dw(F.conv2d(h, self.w, stride=2, padding=1))


def test_dilation_reflect_and_functional_conv_match_hand_reference() -> None:
    model = Geometry().eval()
    gm = lora_fx.inject(model, (X,), lora_fx.LoraConfig(r=2, lora_alpha=3,
                                                        target_modules=["dil", "refl", "w"]))
    randomize_lora(gm, seed=6, scale=0.3)
    (a1, b1), (a2, b2), (a3, b3) = (factors(gm, n) for n in ("dil", "refl", "w"))
    s = lora_scale(3, 2)
    with torch.no_grad():  # y + s·B(A(x)), A with the base geometry, written out here
        h = model.dil(X) + s * F.conv2d(F.conv2d(X, a1, padding=2, dilation=2), b1)
        t = torch.tanh(h)
        padded = F.pad(t, (1, 1, 1, 1), mode="reflect")
        h = model.refl(t) + s * F.conv2d(F.conv2d(padded, a2), b2)
        h = F.conv2d(h, model.w, stride=2, padding=1) + s * F.conv2d(
            F.conv2d(h, a3, stride=2, padding=1), b3)
        want = model.dw(h)
        torch.testing.assert_close(gm(X), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lora_fx.merge(gm)(X), want, rtol=1e-5, atol=1e-5)
    sites = {s.name: s for s in lora_fx.plan(model, (X,), lora_fx.LoraConfig(
        target_modules=["dil"]))[1]}
    assert not peft_reachable(sites["dil"])  # PEFT's A conv drops the dilation


def test_grouped_conv_is_refused_with_reason() -> None:
    with pytest.raises(LoraFxError, match=r"grouped convolution \(groups=5\)"):
        lora_fx.inject(Geometry().eval(), (X,), lora_fx.LoraConfig(target_modules=["dw"]))


def test_conv_adapter_config_is_peft_config(cnn: dict[str, Any]) -> None:
    data = json.loads((cnn["dir"] / "adapter" / "adapter_config.json").read_text())
    assert sorted(data["target_modules"]) == TARGETS
    assert "target_forms" not in data and "enable_lora" not in data
