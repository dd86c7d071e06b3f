"""LoRA on slices of a fused projection (loralib's enable_lora): GPT-2's c_attn (q, k, v in one
Conv1D weight) and nn.MultiheadAttention's in_proj_weight, adapting q and v only.

Reference: a hand merge written here, W[:, slice] += s·(B_j A_j)ᵀ for each enabled slice. Saved
adapters are PEFT's exactly equivalent plain LoRA (rank k·r, block-diagonal B) plus a lorafx-only
lorafx_config.json that restores the slices.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lora_fx
from lora_fx.branches.linear import LoraFused, LoraLinear
from lora_fx.errors import LoraFxError
from tests.helpers import (
    check_merged_onnx,
    factors,
    lora_scale,
    randomize_lora,
    site_weight,
    tiny_gpt2,
    token_ids,
)

MASK = [True, False, True]
IDS = token_ids()


def hand_fused_merge(base: nn.Module, gm: nn.Module, s: float, transposed: bool) -> nn.Module:
    """``base`` with each fused site's q and v slices moved by s·B_j A_j (k untouched); W is
    [in, out] (HF Conv1D) when ``transposed``, else [out, in]."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name in lora_fx.branches(gm):
            a, b = factors(gm, name)
            w = site_weight(ref, name)
            out = w.shape[1] if transposed else w.shape[0]
            d, r = out // 3, a.shape[0] // 2
            for j, i in enumerate((0, 2)):  # enabled slices q (0) and v (2)
                delta = s * b[j * d:(j + 1) * d] @ a[j * r:(j + 1) * r]
                if transposed:
                    w[:, i * d:(i + 1) * d] += delta.T
                else:
                    w[i * d:(i + 1) * d] += delta
    return ref.eval()


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tiny_gpt2()
    cfg = lora_fx.LoraConfig(r=2, lora_alpha=6, target_modules=["c_attn"],
                             enable_lora={"c_attn": MASK})
    gm = lora_fx.inject(base, (IDS,), cfg)
    randomize_lora(gm, seed=11, scale=0.3)
    ref = hand_fused_merge(base, gm, lora_scale(6, 2), transposed=True)
    with torch.no_grad():
        want = ref(IDS).logits
    out = tmp_path_factory.mktemp("fused")
    lora_fx.save_adapter(gm, out / "adapter")
    onnx = check_merged_onnx(gm, lora_fx.capture(base, (IDS,)), (IDS,), want, out)
    return {"base": base, "gm": gm, "ref": ref, "want": want, "dir": out / "adapter", **onnx}


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out["logits"]


def test_fused_branch_shapes(gpt2: dict[str, Any]) -> None:
    b = lora_fx.branches(gpt2["gm"])["transformer.h.0.attn.c_attn"]
    assert isinstance(b, LoraFused) and b.mask == MASK
    assert tuple(b.lora_A.weight.shape) == (4, 32) and tuple(b.lora_B.weight.shape) == (64, 2)


def test_fused_injected_and_merged_equal_hand_merge(gpt2: dict[str, Any]) -> None:
    ids = token_ids(3, 6, seed=4)
    with torch.no_grad():
        want = gpt2["ref"](ids).logits
        torch.testing.assert_close(_logits(gpt2["gm"](ids)), want, rtol=1e-5, atol=1e-5)
        merged = lora_fx.merge(gpt2["gm"])
        torch.testing.assert_close(_logits(merged(ids)), want, rtol=1e-5, atol=1e-5)
        assert (want - gpt2["base"](ids).logits).abs().max() > 1e-3
    w0 = gpt2["base"].transformer.h[0].attn.c_attn.weight
    w1 = merged.get_parameter("transformer.h.0.attn.c_attn.weight")
    assert torch.equal(w0[:, 32:64], w1[:, 32:64])  # k untouched, exactly
    assert not torch.equal(w0[:, :32], w1[:, :32]) and not torch.equal(w0[:, 64:], w1[:, 64:])


def test_fused_merged_onnx_equals_hand_merge(gpt2: dict[str, Any]) -> None:
    """ORT == hand merge within 1e-4, histogram == base (asserted in check_merged_onnx)."""
    assert gpt2["onnx_merged"].op_histogram == gpt2["onnx_base"].op_histogram


def test_saved_fused_adapter_is_peft_exact_plain_lora(gpt2: dict[str, Any]) -> None:
    """PEFT loads the block form as a rank-2r LoRA whose forward is the fused one."""
    data = json.loads((gpt2["dir"] / "adapter_config.json").read_text())
    assert "enable_lora" not in data and "target_forms" not in data
    key = "(?:^transformer\\.h\\.0\\.attn\\.c_attn)"
    assert data["rank_pattern"][key] == 4 and math.isclose(data["alpha_pattern"][key], 12.0)
    state = load_file(str(gpt2["dir"] / "adapter_model.safetensors"))
    b = state["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert tuple(b.shape) == (96, 4) and b[32:64].abs().max() == 0  # k rows: no weights
    assert b[:32, 2:].abs().max() == 0 and b[64:, :2].abs().max() == 0  # block-diagonal
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(gpt2["base"]), gpt2["dir"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(IDS).logits, gpt2["want"], rtol=1e-5, atol=1e-5)


def test_lorafx_reloads_slices_from_its_sidecar(gpt2: dict[str, Any], tmp_path: Path) -> None:
    side = json.loads((gpt2["dir"] / "lorafx_config.json").read_text())
    assert side["config"]["enable_lora"] == {"c_attn": MASK}
    gm = lora_fx.load_adapter(gpt2["base"], (IDS,), gpt2["dir"])
    for name, branch in lora_fx.branches(gm).items():
        assert isinstance(branch, LoraFused)
        a, b = factors(gpt2["gm"], name)
        assert torch.equal(branch.lora_A.weight, a) and torch.equal(branch.lora_B.weight, b)
    plain = tmp_path / "plain"  # without the sidecar: PEFT's plain view, same function
    plain.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (plain / f).write_bytes((gpt2["dir"] / f).read_bytes())
    gm2 = lora_fx.load_adapter(gpt2["base"], (IDS,), plain)
    assert all(isinstance(b, LoraLinear) and b.r == 4 for b in lora_fx.branches(gm2).values())
    with torch.no_grad():
        torch.testing.assert_close(_logits(gm2(IDS)), gpt2["want"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_logits(gm(IDS)), gpt2["want"], rtol=1e-5, atol=1e-5)


def test_weights_outside_the_slices_are_refused(gpt2: dict[str, Any], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("adapter_config.json", "lorafx_config.json"):
        (bad / f).write_bytes((gpt2["dir"] / f).read_bytes())
    state = load_file(str(gpt2["dir"] / "adapter_model.safetensors"))
    state["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"][40, 0] = 1.0
    save_file(state, str(bad / "adapter_model.safetensors"))
    with pytest.raises(LoraFxError, match="outside its slices"):
        lora_fx.load_adapter(gpt2["base"], (IDS,), bad)


def test_in_proj_weight_slices_of_multihead_attention() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(12, 2, 24, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(3))
    cfg = lora_fx.LoraConfig(r=2, lora_alpha=5, target_modules=["in_proj_weight"],
                             enable_lora={"in_proj_weight": MASK})
    gm = lora_fx.inject(layer, (x,), cfg)
    randomize_lora(gm, seed=12, scale=0.3)
    with torch.no_grad():
        want = hand_fused_merge(layer, gm, lora_scale(5, 2), transposed=False)(x)
        torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lora_fx.merge(gm)(x), want, rtol=1e-5, atol=1e-5)
        assert (want - layer(x)).abs().max() > 1e-3


def test_enable_lora_needs_an_evenly_split_linear_site() -> None:
    layer = nn.Sequential(nn.Linear(4, 5))
    with pytest.raises(LoraFxError, match="split evenly"):
        lora_fx.inject(layer, (torch.randn(2, 4),), lora_fx.LoraConfig(
            target_modules=["0"], enable_lora={"0": [True, False]}))
    with pytest.raises(LoraFxError, match="at least one true"):
        lora_fx.LoraConfig(enable_lora={"0": [False, False]})
