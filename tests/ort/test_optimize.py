"""lora_fx.ort.optimize: ONNX Runtime's transformer fusions, checked like any export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import lora_fx
from lora_fx.errors import LoraFxError
from lora_fx.ort import runtime
from lora_fx.ort.optimize import optimize_onnx
from tests.helpers import peft_model_like, randomize_lora, tiny_bert, tiny_gpt2, token_ids

TARGETS = {"gpt2": ["c_attn", "c_fc"], "bert": ["query", "value"]}


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Merged exports of tiny GPT-2 and BERT with random A and B, and PEFT's eager models."""
    out = tmp_path_factory.mktemp("ortopt")
    found = {}
    for kind, make in (("gpt2", tiny_gpt2), ("bert", tiny_bert)):
        base = make()
        gm = lora_fx.inject(base, (token_ids(),), lora_fx.LoraConfig(
            r=4, lora_alpha=8, target_modules=TARGETS[kind]))
        randomize_lora(gm, seed=2)
        lora_fx.export_onnx(gm, (token_ids(),), out / f"{kind}.onnx", merge=True)
        pm = peft_model_like(base, gm, r=4, lora_alpha=8, target_modules=TARGETS[kind])
        found[kind] = (out / f"{kind}.onnx", pm)
    found["dir"] = out
    return found


@pytest.mark.parametrize("kind,fusion", [("gpt2", "FastGelu"), ("bert", "BiasGelu")])
def test_fused_file_equals_peft_eager(merged: dict[str, Any], kind: str, fusion: str) -> None:
    src, pm = merged[kind]
    dst = merged["dir"] / f"{kind}_opt.onnx"
    ids = token_ids(2, 8, seed=5)
    report = optimize_onnx(src, dst, "bert", num_heads=4, hidden_size=32, inputs=(ids,))
    assert report.fused.get("SkipLayerNormalization", 0) >= 2, report.fused
    assert report.fused.get(fusion, 0) >= 2, report.fused
    assert report.nodes_after < report.nodes_before
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    domains = {n.domain for n in onnx.load(str(dst)).graph.node}
    assert "com.microsoft" in domains
    probe = token_ids(3, 11, seed=6)  # other batch and length
    want = pm(probe)[0].detach().numpy()
    got = runtime.run(runtime.open_session(dst), (probe,))[0]
    assert np.abs(got - want).max() <= 1e-4


def test_refusals(merged: dict[str, Any], tmp_path: Path) -> None:
    src, _ = merged["gpt2"]
    with pytest.raises(LoraFxError, match="unknown model_type"):
        optimize_onnx(src, tmp_path / "x.onnx", "resnet")
    with pytest.raises(LoraFxError, match="does not exist"):
        optimize_onnx(tmp_path / "missing.onnx", tmp_path / "x.onnx")
    with pytest.raises(LoraFxError, match="is the input file"):
        optimize_onnx(src, src)


def test_mismatch_removes_the_output(merged: dict[str, Any], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import lora_fx.ort.optimize as mod

    src, _ = merged["gpt2"]
    monkeypatch.setattr(mod, "compare_sessions", lambda *a, **k: 1.0)
    dst = tmp_path / "bad.onnx"
    with pytest.raises(LoraFxError, match="changed the outputs"):
        optimize_onnx(src, dst, inputs=(token_ids(),))
    assert not dst.exists()
    assert not list(tmp_path.glob(".bad.onnx*"))
