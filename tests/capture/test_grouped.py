"""lorafx::grouped_mm (issue 26): transformers' grouped expert product, whose backward computes
only the gradients asked for; a MoE capture uses it instead of transformers' op."""

from __future__ import annotations

import pytest
import torch

import lora_fx
from lora_fx.grouped_mm import grouped_mm
from tests.helpers import ROOT, load_model_file

MOE = load_model_file(ROOT / "tests" / "models" / "tiny_moe.py")


def reference(x: torch.Tensor, w: torch.Tensor, offs: list[int]) -> torch.Tensor:
    """Row block e = rows [offs[e-1], offs[e]) times w[e]; rows past offs[-1] are 0."""
    starts = [0, *offs[:-1]]
    rows = [x[a:b] @ w[e] for e, (a, b) in enumerate(zip(starts, offs, strict=True))]
    return torch.cat([*rows, x.new_zeros(x.shape[0] - offs[-1], w.shape[-1])])


@pytest.mark.parametrize("offs", [[2, 2, 5, 7], [0, 3, 3, 6]])  # empty blocks; a tail row
@pytest.mark.parametrize("grads", ["x", "w", "both"])
def test_grouped_mm_equals_blocks_and_computes_only_wanted_gradients(offs: list[int],
                                                                     grads: str) -> None:
    g = torch.Generator().manual_seed(0)
    x0, w0 = torch.randn(7, 5, generator=g), torch.randn(4, 5, 3, generator=g)
    x, w = x0.clone().requires_grad_(grads != "w"), w0.clone().requires_grad_(grads != "x")
    xr, wr = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    dy = torch.randn(7, 3, generator=g)
    y = grouped_mm(x, w, torch.tensor(offs, dtype=torch.int32))
    want = reference(xr, wr, offs)
    torch.testing.assert_close(y, want)
    (y * dy).sum().backward()
    (want * dy).sum().backward()
    assert (x.grad is None) == (grads == "w") and (w.grad is None) == (grads == "x")
    for got, ref in ((x.grad, xr.grad), (w.grad, wr.grad)):
        if got is not None:
            torch.testing.assert_close(got, ref)


def test_moe_capture_uses_lorafx_grouped_mm() -> None:
    gm = lora_fx.capture(MOE.mixtral(), (torch.ones(2, 5, dtype=torch.long),))
    targets = {str(n.target) for n in gm.graph.nodes if "grouped_mm" in str(n.target)}
    assert targets == {"lorafx.grouped_mm.default"}
