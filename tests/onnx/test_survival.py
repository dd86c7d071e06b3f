"""The survival report of a merged adapter after quantization (``onnx.survival``): hand-computed
ratios and cosines, then real int4 files of y = x·W and y = x·(W + ΔW) where ΔW is far below
the int4 step (lost) or comparable to W (kept)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lora_fx.onnx.quantize import quantize
from lora_fx.onnx.survival import adapter_survival

BASE = np.zeros(2)
INTENT = np.array([3.0, 4.0])   # d = (3, 4), |d| = 5


@pytest.mark.parametrize("merged,ratio,cosine,lost", [
    ([3.0, 4.0], 1.0, 1.0, False),               # kept exactly
    ([6.0, 8.0], 2.0, 1.0, False),               # twice as large: the edge of the range
    ([6.3, 8.4], 2.1, 1.0, True),                # past 2x
    ([1.2, 1.6], 0.4, 1.0, True),                # shrunk to 0.4x
    ([4.0, -3.0], 1.0, 0.0, True),               # same size, orthogonal
    ([0.0, 0.0], 0.0, 0.0, True),                # nothing left
    # d + n with n ⟂ d: |n| = |d| / 2 kept (ratio √1.25, cosine 1/√1.25), |n| = 2|d| lost
    # (ratio √5 > 2 and cosine 1/√5 < 0.5 together, as the module docstring derives)
    ([5.0, 2.5], math.sqrt(1.25), 1 / math.sqrt(1.25), False),
    ([11.0, -2.0], math.sqrt(5.0), 1 / math.sqrt(5.0), True),
])
def test_hand_computed(merged: list[float], ratio: float, cosine: float, lost: bool) -> None:
    got = adapter_survival(BASE, np.array(merged), BASE, INTENT)
    assert got.ratio == pytest.approx(ratio, rel=1e-12)
    assert got.cosine == pytest.approx(cosine, abs=1e-12)
    assert got.effect == 5.0 and got.noise == 0.0
    assert got.lost is lost
    assert ("--no-merge" in got.message) is lost


def test_outputs_are_flattened_together_and_noise_reported() -> None:
    """Several outputs (arrays and tensors) count as one vector; the base's own error is
    reported in units of |d|."""
    base_q = [np.array([[0.0, 0.0]]), torch.tensor([1.0])]
    merged_q = [np.array([[3.0, 0.0]]), torch.tensor([5.0])]
    base = [np.array([[0.0, 0.0]]), torch.tensor([2.0])]     # base_q - base = (0, 0, -1)
    adapter = [np.array([[3.0, 0.0]]), torch.tensor([6.0])]  # d = (3, 0, 4)
    got = adapter_survival(base_q, merged_q, base, adapter, dtype="int8")
    assert (got.ratio, got.cosine, got.noise, got.effect) == pytest.approx((1.0, 1.0, 0.2, 5.0))
    assert not got.lost and "int8" in got.message


def test_no_effect_is_not_lost_and_sizes_must_match() -> None:
    same = adapter_survival(BASE, BASE, INTENT, INTENT)
    assert not same.lost and same.effect == 0.0 and "nothing" in same.message
    with pytest.raises(ValueError, match="differ in size"):
        adapter_survival(BASE, BASE, BASE, np.zeros(3))


def linear(w: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="linear")],
                              "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                      [None, w.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w.astype(np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


@pytest.mark.parametrize("scale,lost", [(1e-3, True), (0.3, False)])
def test_int4_files(scale: float, lost: bool) -> None:
    """W ~ N(0, 1) [64, 48] (int4 step about 0.3 per block of 32); a rank-4 ΔW = A'B' with
    entries about ``scale``: 1e-3 vanishes in the rounding, 0.3 survives."""
    g = np.random.default_rng(0)
    w = g.standard_normal((64, 48))
    delta = g.standard_normal((64, 4)) @ g.standard_normal((4, 48)) * (scale / 2)
    x = g.standard_normal((16, 64)).astype(np.float32)
    y_base, y_adapter = x @ w.astype(np.float32), x @ (w + delta).astype(np.float32)
    y_base_q, y_merged_q = run(quantize(linear(w)), x), run(quantize(linear(w + delta)), x)
    got = adapter_survival(y_base_q, y_merged_q, y_base, y_adapter)
    assert got.lost is lost, got.message
    if lost:
        assert got.noise > 10 and "--no-merge" in got.message
    else:
        assert got.cosine > 0.9 and 0.8 < got.ratio < 1.25
