"""PEFT's adapter dtype policy: fp32 A, B on an fp16/bf16 base (``autocast_adapter_dtype``).

Reference: PEFT's ``get_peft_model`` on the same bf16 base (which upcasts its LoRA factors to
fp32 by default) carrying the same random A, B. lorafx's default branch computes in the
input's dtype from the fp32 factors (cast inside the graph); ``branch_compute="adapter"``
computes as PEFT (input cast to fp32, Δ cast back). Both must stay within 5e-2 of the largest
output (bf16 rounding, amplified through the layers; not an exactness claim).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors import safe_open
from torch import nn

import lora_fx
from lora_fx.config import LoraConfig
from lora_fx.errors import LoraFxError
from lora_fx.passes.inject import adapter_dtype
from tests.helpers import tiny_gpt2, tiny_llama

TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"], "llama": ["q_proj", "v_proj", "up_proj"]}
BUILD = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(seed))


def _random_factors(gm: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in lora_fx.branches(gm).values():
            for w in (b.lora_A.weight, b.lora_B.weight):
                w.copy_(torch.randn(w.shape, generator=g) * 0.1)


def _peft_like(base: nn.Module, gm: nn.Module, autocast: bool = True, **cfg: Any) -> nn.Module:
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg),
                             autocast_adapter_dtype=autocast)
    state = {}
    for name, b in lora_fx.branches(gm).items():
        state[f"base_model.model.{name}.lora_A.default.weight"] = b.lora_A.weight.detach()
        state[f"base_model.model.{name}.lora_B.default.weight"] = b.lora_B.weight.detach()
    assert not pm.load_state_dict(state, strict=False).unexpected_keys
    return pm.eval()


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def test_policy_matches_peft() -> None:
    assert adapter_dtype(torch.bfloat16) == torch.float32
    assert adapter_dtype(torch.float16) == torch.float32
    assert adapter_dtype(torch.float8_e4m3fn) == torch.float32
    assert adapter_dtype(torch.float32) == torch.float32
    assert adapter_dtype(torch.float64) == torch.float64
    assert adapter_dtype(torch.bfloat16, autocast=False) == torch.bfloat16


@pytest.mark.parametrize("compute", ["input", "adapter"])
@pytest.mark.parametrize("name", sorted(BUILD))
def test_bf16_base_gets_fp32_factors_and_peft_output(name: str, compute: str) -> None:
    base = BUILD[name]().to(torch.bfloat16)
    gm = lora_fx.inject(base, (_ids(),), LoraConfig(r=4, lora_alpha=8,
                                                    target_modules=TARGETS[name],
                                                    branch_compute=compute))
    assert {p.dtype for p in lora_fx.lora_parameters(gm)} == {torch.float32}
    _random_factors(gm)
    pm = _peft_like(base, gm, r=4, lora_alpha=8, target_modules=TARGETS[name])
    assert {p.dtype for n, p in pm.named_parameters() if "lora_" in n} == {torch.float32}
    with torch.no_grad():
        want = pm(_ids(1)).logits
        got = gm(_ids(1)).logits
        fused = lora_fx.training_graph(gm)(_ids(1)).logits
    assert got.dtype == torch.bfloat16
    err, err_fused = _rel_err(got, want), _rel_err(fused, want)
    print(f"{name} bf16, fp32 factors, compute={compute}: {err:.3g} of max |y| "
          f"(training_graph {err_fused:.3g})")
    assert err <= 5e-2 and err_fused <= 5e-2


def test_gradients_reach_the_fp32_masters() -> None:
    """A step on a bf16 base: A, B get fp32 gradients and an AdamW update that a bf16 weight
    would round away (lr·update below half a bf16 ulp of the weight) still moves them."""
    base = tiny_gpt2().to(torch.bfloat16)
    gm = lora_fx.inject(base, (_ids(),), LoraConfig(r=4, target_modules=["c_attn"]))
    _random_factors(gm)
    params = lora_fx.lora_parameters(gm)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-5)
    gm.train()
    gm(_ids()).logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    opt.step()
    moved = [(p - q).abs().max() for p, q in zip(params, before, strict=True)]
    assert all(m > 0 for m in moved)
    lost = sum(int(((p != q) & (p.to(torch.bfloat16) == q.to(torch.bfloat16))).sum())
               for p, q in zip(params, before, strict=True))
    total = sum(p.numel() for p in params)
    print(f"{lost / total:.0%} of the fp32 updates would round away in bf16")
    assert lost > total // 2  # kept by the fp32 masters, lost by a bf16 weight


def test_opt_out_keeps_the_base_dtype_as_peft() -> None:
    base = tiny_llama().to(torch.bfloat16)
    gm = lora_fx.inject(base, (_ids(),), LoraConfig(r=4, target_modules=["q_proj"],
                                                    autocast_adapter_dtype=False))
    assert {p.dtype for p in lora_fx.lora_parameters(gm)} == {torch.bfloat16}
    _random_factors(gm)
    pm = _peft_like(base, gm, autocast=False, r=4, target_modules=["q_proj"])
    assert {p.dtype for n, p in pm.named_parameters() if "lora_" in n} == {torch.bfloat16}
    with torch.no_grad():
        assert _rel_err(gm(_ids()).logits, pm(_ids()).logits) <= 1e-2


@pytest.mark.parametrize("autocast", [True, False])
def test_saved_in_the_parameters_dtype_and_loaded_by_peft(tmp_path: Path,
                                                           autocast: bool) -> None:
    base = tiny_gpt2().to(torch.bfloat16)
    gm = lora_fx.inject(base, (_ids(),), LoraConfig(r=4, target_modules=["c_attn"],
                                                    autocast_adapter_dtype=autocast))
    _random_factors(gm)
    lora_fx.save_adapter(gm, tmp_path / "a")
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 - safe_open API
    assert dtypes == {torch.float32 if autocast else torch.bfloat16}
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert "autocast_adapter_dtype" not in written and "branch_compute" not in written
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    with torch.no_grad():
        assert _rel_err(gm(_ids()).logits, pm(_ids()).logits) <= 5e-2
    back = lora_fx.load_adapter(tiny_gpt2().to(torch.bfloat16), (_ids(),), tmp_path / "a",
                                autocast_adapter_dtype=autocast)
    assert {p.dtype for p in lora_fx.lora_parameters(back)} == dtypes
    up = lora_fx.load_adapter(tiny_gpt2().to(torch.bfloat16), (_ids(),), tmp_path / "a")
    assert {p.dtype for p in lora_fx.lora_parameters(up)} == {torch.float32}


def test_peft_json_round_trip_ignores_the_lorafx_fields() -> None:
    cfg = LoraConfig(r=4, target_modules=["q_proj"], autocast_adapter_dtype=False,
                     branch_compute="adapter")
    data = cfg.to_peft_dict()
    assert "autocast_adapter_dtype" not in data and "branch_compute" not in data
    peft_cfg = peft.LoraConfig(**{k: v for k, v in data.items() if k != "peft_type"})
    back = LoraConfig.from_peft_dict(peft_cfg.to_dict())
    assert back.autocast_adapter_dtype is True and back.branch_compute == "input"
    with pytest.raises(LoraFxError, match="branch_compute='fast' must be one of input, adapter"):
        LoraConfig(r=4, target_modules=["q_proj"], branch_compute="fast")
    with pytest.raises(LoraFxError, match="autocast_adapter_dtype='yes'.*true or false"):
        LoraConfig(r=4, target_modules=["q_proj"], autocast_adapter_dtype="yes")  # type: ignore
