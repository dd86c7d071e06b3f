"""The verification limit (``onnx.limits``) against hand-computed numbers: it scales with the
outputs, and the adapter's own effect bounds it, so a lost or mis-scaled adapter fails."""

from __future__ import annotations

import pytest
import torch

from lora_fx.errors import LoraFxError
from lora_fx.onnx.limits import judge, max_diff, refuse


def outputs(seed: int = 0, scale: float = 40.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(y with an adapter, y_base): logits of magnitude ``scale``, the adapter moving them
    by about 1."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(2, 7, 50, generator=g) * scale / 4
    return base + torch.randn(2, 7, 50, generator=g) * 0.3, base


def test_the_fp32_limit_scales_with_the_outputs() -> None:
    y, base = outputs()
    top = float(y.abs().max())
    check = judge("c", [y + 3e-4], [y])
    assert check.limit == pytest.approx(1e-4 + 2e-5 * top)
    assert check.ok and check.basis == f"0.0001 + 2e-05 x max|y| {top:.3g}"
    small = judge("c", [y / 100 + 3e-4], [y / 100])  # the same error on small outputs fails
    assert not small.ok


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("factor", [0.0, 2.0, 1.6])
def test_a_lost_or_mis_scaled_adapter_fails_in_every_precision(dtype: str,
                                                                factor: float) -> None:
    y, base = outputs()
    wrong = base + factor * (y - base)  # B scaled by factor: 0 lost, 2 doubled
    check = judge("c", [wrong], [y], dtype, base=[base])
    assert not check.ok, check
    assert check.effect == pytest.approx(float((y - base).abs().max()), rel=1e-6)


def test_fp16_noise_passes_when_small_against_the_adapter() -> None:
    y, base = outputs()
    noisy = y + 0.05 * torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).sign()
    check = judge("c", [noisy], [y], "fp16", base=[base])
    effect = float((y - base).abs().max())
    assert check.limit == pytest.approx(min(2e-3 + 1e-2 * float(y.abs().max()), 0.25 * effect))
    assert check.ok and "adapter's effect" in check.basis


def test_an_adapter_within_fp32_noise_is_reported_blind_not_failed() -> None:
    y, base = outputs()
    tiny = base + 1e-6 * (y - base)
    check = judge("c", [tiny + 1e-4], [tiny], base=[base])
    assert check.ok and check.blind


def test_output_count_and_shape_must_agree() -> None:
    y, _ = outputs()
    with pytest.raises(LoraFxError, match="returned 1 outputs, PyTorch 2"):
        max_diff([y], [y, y])
    with pytest.raises(LoraFxError, match="shape"):
        max_diff([y[:1]], [y])


def test_refusal_is_one_line_with_basis_and_remedy() -> None:
    y, base = outputs()
    checks = [judge("decode", [y], [y], base=[base]), judge("prefill", [base], [y], base=[base])]
    with pytest.raises(LoraFxError) as err:
        refuse(checks, "CPUExecutionProvider", "m.onnx")
    text = str(err.value)
    assert "\n" not in text and text.startswith("verification failed (prefill)")
    assert "max|y|" in text and "100% of the adapter's own effect" in text and "--atol" in text
    refuse(checks[:1], "CPUExecutionProvider", "m.onnx")  # every check within: nothing raised
