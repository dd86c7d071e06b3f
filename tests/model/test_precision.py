"""Merges of bf16/fp16 models: W' = W + s·B@A computed in fp32 and cast once.

The reference is the exact merge in fp64 of the same low-precision W, A, B (s = alpha / r and
each weight's layout written here); the best a bf16 weight can be is that value correctly
rounded. A naive merge in the model's dtype (``W + s * (B @ A)``, every op rounding) is
compared with it as well: lorafx's merge must be correctly rounded almost everywhere and closer
to the reference than the naive one.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx.errors import LoraFxError
from tests.helpers import (
    TINY_LAYOUTS,
    factors,
    gpt3_small,
    lora_scale,
    randomize_lora,
    site_weight_path,
    tiny_mlp,
)

CASES = {  # model, example input, {target: layout} (covering [out, in] and [in, out] weights)
    "gpt3_small": (gpt3_small, lambda: torch.randint(0, 97, (2, 8)),
                   {"q_proj": "out_in", "v_proj": "out_in", "fc_in": "out_in"}),  # nn.Linear
    "tiny_mlp": (lambda: tiny_mlp()[0], lambda: torch.randn(4, 32), TINY_LAYOUTS),
}
S = lora_scale(8, 4)  # r = 4, lora_alpha = 8


def _merged(case: str, dtype: torch.dtype) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(base in dtype, merged, {weight path: (W, exact merge in fp64, naive, lorafx's)})."""
    build, inputs, layouts = CASES[case]
    base = build().to(dtype)
    x = inputs()
    x = x.to(dtype) if x.is_floating_point() else x
    gm = lora_fx.inject(base, (x,), lora_fx.LoraConfig(  # factors in the model's dtype too
        r=4, lora_alpha=8, target_modules=sorted(layouts), autocast_adapter_dtype=False))
    randomize_lora(gm, seed=1, scale=0.3)
    merged = lora_fx.merge(gm)
    out: dict[str, Any] = {}
    for name in lora_fx.branches(gm):
        path = site_weight_path(base, name)
        w = base.get_parameter(path).detach()
        a, b = factors(gm, name)
        exact = S * (b.double() @ a.double())
        naive = S * (b @ a)  # every op in the model's dtype
        if layouts[name.rsplit(".", 1)[-1]] == "in_out":
            exact, naive = exact.t(), naive.t()
        out[path] = (w, w.double() + exact, w + naive, merged.get_parameter(path))
    return base, merged, out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fp32_merge_is_correctly_rounded(case: str, dtype: torch.dtype) -> None:
    _, _, sites = _merged(case, dtype)
    ours_err = naive_err = 0.0
    ours_exact = naive_exact = total = 0
    for name, (w, ref, naive, merged) in sites.items():
        assert merged.dtype == dtype, name
        assert not torch.equal(merged, w), f"{name}: nothing was merged"
        best = ref.to(dtype)  # the reference correctly rounded once
        ours_exact += int((merged == best).sum())
        naive_exact += int((naive == best).sum())
        total += best.numel()
        ours_err += float((merged.double() - ref).abs().sum())
        naive_err += float((naive.double() - ref).abs().sum())
    print(f"{case} {dtype}: correctly rounded {ours_exact / total:.5f} (naive "
          f"{naive_exact / total:.5f}); mean |err| {ours_err / total:.3g} vs naive "
          f"{naive_err / total:.3g} ({naive_err / ours_err:.2f}x)")
    assert ours_exact / total > 0.999
    assert naive_exact / total < 0.99
    assert ours_err < naive_err


def test_merged_outputs_closer_to_fp64_reference() -> None:
    """Output of the merged bf16 weights (run in fp64) vs the exact fp64 merge's output."""
    base, _, sites = _merged("gpt3_small", torch.bfloat16)
    x = torch.randint(0, 97, (2, 8))

    def run(which: int) -> torch.Tensor:
        model = gpt3_small().double()
        state = {k: v.double() for k, v in base.state_dict().items()}
        state.update({path: s[which].double() for path, s in sites.items()})
        model.load_state_dict(state)
        with torch.no_grad():
            return model(x)  # type: ignore[no-any-return]

    ref = run(1)
    ours, naive = (run(3) - ref).abs().mean(), (run(2) - ref).abs().mean()
    print(f"bf16 merged output mean |err| {float(ours):.3g} vs naive {float(naive):.3g}")
    assert ours < naive


def test_fp16_overflow_is_refused() -> None:
    """A merge whose result leaves fp16's range is refused, not written as inf."""
    base = tiny_mlp()[0].half()
    gm = lora_fx.inject(base, (torch.randn(4, 32).half(),),
                        lora_fx.LoraConfig(r=2, target_modules=["head"]))
    with torch.no_grad():
        branch = lora_fx.branches(gm)["head"]
        branch.lora_A.weight.fill_(300.0)
        branch.lora_B.weight.fill_(300.0)
    with pytest.raises(LoraFxError, match="non-finite"):
        lora_fx.merge(gm)
