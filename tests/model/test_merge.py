"""The merge: W' = W + s·B@A folded into the weights, in place when asked; refusals leave
everything as it was. References written here: s = alpha / r, nn.Linear's W [out, in]."""

from __future__ import annotations

import pytest
import torch

import lora_fx
from lora_fx.errors import LoraFxError
from lora_fx.load.model import load_model
from tests.helpers import TINY, factors, injected_gpt3_small, lora_scale


def test_inplace_merge_folds_into_the_same_storage() -> None:
    """merge(inplace=True): W' = W + s·B@A written into W's own tensor, equal to the copy merge
    and to a hand merge; the injected model then refuses to run (it would add Δ twice)."""
    base, gm, ids = injected_gpt3_small()
    copy_merged = lora_fx.merge(gm)
    with torch.no_grad():
        want = copy_merged(ids)
    q = base.blocks[1].attn.q_proj.weight
    a, b = factors(gm, "blocks.1.attn.q_proj")
    hand = q.detach().double() + lora_scale(8, 4) * (b.double() @ a.double())  # nn.Linear
    ptr, wte = q.data_ptr(), base.wte.weight.detach().clone()
    merged = lora_fx.merge(gm, inplace=True)
    assert merged.get_parameter("blocks.1.attn.q_proj.weight") is q and q.data_ptr() == ptr
    torch.testing.assert_close(q.detach().double(), hand, atol=1e-6, rtol=0)
    assert torch.equal(base.wte.weight, wte)  # not a site: untouched
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), want, atol=1e-5, rtol=0)
    with pytest.raises(lora_fx.LoraFxError, match="merged in place"):
        gm(ids)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e30])
def test_merge_refuses_non_finite_weights(value: float) -> None:
    """inf / nan in B, or A, B that overflow fp32 in B@A: refused, nothing changed."""
    tiny = load_model(str(TINY))
    before = {k: v.clone() for k, v in tiny.module.state_dict().items()}
    gm = lora_fx.inject(tiny.module, tiny.example_inputs,
                        lora_fx.LoraConfig(r=2, target_modules=["w_in", "head"]))
    with torch.no_grad():
        branch = lora_fx.branches(gm)["head"]
        branch.lora_A.weight.fill_(value if value == 1e30 else 0.5)
        branch.lora_B.weight.fill_(value)
    out = gm(*tiny.example_inputs)
    with pytest.raises(LoraFxError, match="merging site 'head' gives non-finite weights"):
        lora_fx.merge(gm)
    torch.testing.assert_close(gm(*tiny.example_inputs), out, atol=0, rtol=0, equal_nan=True)
    assert all(torch.equal(v, before[k]) for k, v in tiny.module.state_dict().items())

