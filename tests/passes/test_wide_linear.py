"""lora_fx.passes.wide_linear: a linear computed in column blocks equals F.linear (forward and
gradients); the choice is measured once per shape and followed."""

from __future__ import annotations

import pytest
import torch

from lora_fx.passes import wide_linear as wl
from lora_fx.passes.wide_linear import BLOCK, _BlockedLinear


@pytest.mark.parametrize("bias", [False, True])
def test_blocked_linear_equals_linear_forward_and_grads(bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    n = 2 * BLOCK + 77  # two whole blocks and a partial one
    x = torch.randn(3, 5, 16, generator=g).requires_grad_(True)
    w = torch.randn(n, 16, generator=g).requires_grad_(True)
    b = torch.randn(n, generator=g).requires_grad_(True) if bias else None
    inputs = [x, w] + ([b] if b is not None else [])
    got = _BlockedLinear.apply(x, w, b)
    want = torch.nn.functional.linear(x, w, b)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    seed = torch.randn(want.shape, generator=g)
    for ours, ref in zip(torch.autograd.grad(got, inputs, seed),
                         torch.autograd.grad(want, inputs, seed), strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)


def test_wide_linear_measures_once_per_shape_and_follows_the_choice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    monkeypatch.setattr(wl, "_choice", {})
    monkeypatch.setattr(wl, "_tune", lambda x, w, b: calls.append(tuple(w.shape)) or True)
    blocked: list[int] = []
    real = wl._blocked
    monkeypatch.setattr(wl, "_blocked", lambda x, w, b: blocked.append(1) or real(x, w, b))
    x, w = torch.randn(4, 8), torch.randn(wl.BLOCK + 3, 8)
    for _ in range(3):
        torch.testing.assert_close(wl.wide_linear(x, w), x @ w.t())
    assert calls == [(wl.BLOCK + 3, 8)] and len(blocked) == 3
    monkeypatch.setattr(wl, "_choice", {})
    monkeypatch.setattr(wl, "_tune", lambda x, w, b: False)
    wl.wide_linear(x, w)
    assert len(blocked) == 3  # measured slower: the plain linear runs

