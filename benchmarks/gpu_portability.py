"""The GPU checks of issue 15, as a user runs them: load on the CPU, inject, move; capture on
the GPU; fp32 adapters on a bf16 base; export a GPU-resident model and verify it on CUDA.

Each check returns figures (errors relative to max |y|, providers, TF32 state); ``gpu_check.py``
runs them and fails only on an exception or an equality check beyond its tolerance. On the CPU
(the rehearsal) every step runs with the CPU standing in for CUDA.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

TARGETS = ["q_proj", "v_proj", "up_proj"]


def _llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=97, max_position_embeddings=64, use_cache=False,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()


def _randomized(gm: Any, seed: int = 0) -> Any:
    import lora_fx

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in lora_fx.branches(gm).values():
            for w in (b.lora_A.weight, b.lora_B.weight):
                w.copy_(torch.randn(w.shape, generator=g) * 0.1)
    return gm


def _peft(base: Any, gm: Any) -> Any:
    import peft

    import lora_fx

    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS))
    state = {}
    for name, b in lora_fx.branches(gm).items():
        state[f"base_model.model.{name}.lora_A.default.weight"] = b.lora_A.weight.detach()
        state[f"base_model.model.{name}.lora_B.default.weight"] = b.lora_B.weight.detach()
    pm.load_state_dict(state, strict=False)
    return pm.eval()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    return float((got - want).abs().max() / want.abs().max())


def _logits(module: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(ids).logits


def moved(device: torch.device) -> dict[str, Any]:
    """Inject on the CPU, then ``.to(device)`` / ``.to(bf16)`` / merge there: outputs against
    the CPU model and PEFT's model moved the same way."""
    import lora_fx

    base = _llama()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    gm = _randomized(lora_fx.inject(base, (ids,), lora_fx.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS)))
    pm = _peft(base, gm)
    want = _logits(pm, ids)
    on = copy.deepcopy(gm).to(device)
    out: dict[str, Any] = {"injected .to(device) vs PEFT (cpu)": _rel(_logits(on, ids.to(device)),
                                                                       want)}
    merged = lora_fx.merge(on)
    out["merged on device vs PEFT (cpu)"] = _rel(_logits(merged, ids.to(device)), want)
    low = copy.deepcopy(gm).to(device).to(torch.bfloat16)
    pm_low = copy.deepcopy(pm).to(device).to(torch.bfloat16)
    out["injected .to(device).to(bf16) vs PEFT the same way"] = _rel(
        _logits(low, ids.to(device)), _logits(pm_low, ids.to(device)))
    back = copy.deepcopy(low).to("cpu").float()
    out["... then .to(cpu).float() runs"] = _rel(_logits(back, ids), _logits(
        copy.deepcopy(pm_low).to("cpu").float(), ids))
    return out


def captured_on_device(device: torch.device) -> dict[str, Any]:
    """Capture where the weights live (the GPU), then move to the CPU."""
    import lora_fx

    base = _llama().to(device)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    gm = _randomized(lora_fx.inject(base, (ids.to(device),), lora_fx.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS)))
    want = _logits(gm, ids.to(device))
    return {"captured on device, moved to cpu": _rel(_logits(copy.deepcopy(gm).to("cpu"), ids),
                                                      want)}


def adapter_dtype(device: torch.device) -> dict[str, Any]:
    """fp32 factors on a bf16 base on the device, both branch computes, against PEFT."""
    import lora_fx

    base = _llama().to(device=device, dtype=torch.bfloat16)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    out: dict[str, Any] = {}
    for compute in ("input", "adapter"):
        gm = _randomized(lora_fx.inject(base, (ids,), lora_fx.LoraConfig(
            r=4, lora_alpha=8, target_modules=TARGETS, branch_compute=compute)))
        dtypes = sorted({str(p.dtype) for p in lora_fx.lora_parameters(gm)})
        out[f"bf16 base, compute={compute}: factor dtypes"] = dtypes
        out[f"bf16 base, compute={compute}: vs PEFT"] = _rel(_logits(gm, ids),
                                                             _logits(_peft(base, gm), ids))
    return out


def exported(device: torch.device, providers: list[Any], tmp: Path) -> dict[str, Any]:
    """export_onnx of a GPU-resident injected model: fp32 merged and bf16, verified by
    ONNX Runtime on ``providers`` (CUDA: TF32 off, see the report's verification)."""
    import lora_fx

    base = _llama().to(device)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    gm = _randomized(lora_fx.inject(base, (ids,), lora_fx.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS)))
    out: dict[str, Any] = {}
    for dtype in ("fp32", "bf16", "fp16"):
        try:
            report = lora_fx.export_onnx(gm, (ids,), tmp / f"dev_{dtype}.onnx", dtype=dtype,
                                         providers=providers)
            out[f"export {dtype} from device"] = {
                "max_abs_diff": report.max_abs_diff, "provider": report.provider,
                **{k: v for k, v in report.extras.items() if k in (
                    "verification", "error_vs_fp32", "verify_skipped")}}
        except Exception as err:  # noqa: BLE001 - reported, the next check still runs
            out[f"export {dtype} from device"] = {"error": f"{type(err).__name__}: {err}"}
    return out


def run_all(device: torch.device, providers: list[Any], tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for check in (moved, captured_on_device, adapter_dtype):
        try:
            out.update(check(device))
        except Exception as err:  # noqa: BLE001 - reported, the next check still runs
            out[check.__name__] = {"error": f"{type(err).__name__}: {err}"}
    out.update(exported(device, providers, tmp))
    return out


LIMITS = {  # relative to max |y|: fp32 on one device or two; bf16 noise
    "injected .to(device) vs PEFT (cpu)": 1e-4, "merged on device vs PEFT (cpu)": 1e-4,
    "captured on device, moved to cpu": 1e-4,
    "injected .to(device).to(bf16) vs PEFT the same way": 5e-2,
    "... then .to(cpu).float() runs": 1e-4,
    "bf16 base, compute=input: vs PEFT": 5e-2, "bf16 base, compute=adapter: vs PEFT": 5e-2,
}


def failures(result: dict[str, Any]) -> dict[str, Any]:
    """Checks beyond their limit or that raised."""
    bad = {k: v for k, v in result.items() if isinstance(v, dict) and "error" in v}
    bad.update({k: v for k, v in result.items() if k in LIMITS and not v <= LIMITS[k]})
    return bad
