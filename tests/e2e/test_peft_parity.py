"""Real HF families from small configs: lorafx == PEFT's forward, merged == injected, ONNX
Runtime == PEFT, merged ONNX op histogram == base export; adapters round-trip with PEFT."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx.api import export_onnx
from lora_fx.graph.state import NODE_KEY
from lora_fx.onnx.verify import flat_outputs
from tests.helpers import (
    peft_model_like,
    randomize_lora,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    token_ids,
)

FAMILIES: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"]),
    "bert": (tiny_bert, ["query", "value", "dense"]),
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]),
}


def _first(out: Any) -> torch.Tensor:
    return flat_outputs(out)[0]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, Any]:
    """One family injected with random A and B, its PEFT twin, and merged + base exports."""
    build, targets = FAMILIES[request.param]
    base = build()
    ids = token_ids()
    cfg = dict(r=4, lora_alpha=8, target_modules=targets)
    gm = lora_fx.inject(base, (ids,), lora_fx.LoraConfig(**cfg))
    randomize_lora(gm, seed=1)
    gm.eval()
    out = tmp_path_factory.mktemp(request.param)
    merged_report = export_onnx(gm, (ids,), out / "merged.onnx", merge=True)
    base_report = export_onnx(lora_fx.capture(base, (ids,)), (ids,), out / "base.onnx")
    return {"name": request.param, "base": base, "gm": gm, "cfg": cfg, "ids": ids,
            "peft": peft_model_like(base, gm, **cfg), "merged": merged_report,
            "base_onnx": base_report, "dir": out}


def test_injected_equals_peft(family: dict[str, Any]) -> None:
    ids = token_ids(3, 6, seed=5)  # another batch and length: the capture is dynamic
    with torch.no_grad():
        ours = _first(family["gm"](ids))
        ref = _first(family["peft"](ids))
        plain = _first(family["base"](ids))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-3  # the adapter really changes the output


def test_merged_equals_injected_and_has_no_lora_node(family: dict[str, Any]) -> None:
    merged = lora_fx.merge(family["gm"])
    assert not [n for n in merged.graph.nodes if NODE_KEY in n.meta]
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = token_ids(2, 7, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(_first(merged(ids)), _first(family["peft"](ids)),
                                   rtol=1e-5, atol=1e-5)


def test_onnx_runtime_equals_peft(family: dict[str, Any]) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(family["merged"].path), providers=["CPUExecutionProvider"])
    ids = token_ids(3, 5, seed=7)
    got = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]
    with torch.no_grad():
        want = _first(family["peft"](ids)).numpy()
    assert abs(got - want).max() < 1e-4
    assert family["merged"].max_abs_diff is not None and family["merged"].max_abs_diff < 1e-4


def test_merged_onnx_has_base_op_histogram(family: dict[str, Any]) -> None:
    import onnx

    assert family["merged"].op_histogram == family["base_onnx"].op_histogram
    merged = onnx.load(str(family["merged"].path))
    base = onnx.load(str(family["base_onnx"].path))
    assert [i.name for i in merged.graph.input] == [i.name for i in base.graph.input]
    assert len(merged.graph.initializer) == len(base.graph.initializer)


def test_lorafx_adapter_loads_in_peft(family: dict[str, Any], tmp_path: Path) -> None:
    from peft import PeftModel

    lora_fx.save_adapter(family["gm"], tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    pm = PeftModel.from_pretrained(copy.deepcopy(family["base"]), str(tmp_path / "ad"))
    pm.eval()
    ids = token_ids(2, 6, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(_first(pm(ids)), _first(family["gm"](ids)),
                                   rtol=1e-5, atol=1e-5)


def test_peft_adapter_loads_in_lorafx(family: dict[str, Any], tmp_path: Path) -> None:
    import peft

    pm = peft.get_peft_model(copy.deepcopy(family["base"]), peft.LoraConfig(
        r=3, lora_alpha=5, target_modules=family["cfg"]["target_modules"][:2],
        init_lora_weights=False))  # PEFT's own random A and B
    pm.save_pretrained(str(tmp_path / "peft"))
    gm = lora_fx.load_adapter(family["base"], (family["ids"],), tmp_path / "peft")
    gm.eval()
    pm.eval()
    ids = token_ids(2, 6, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(_first(gm(ids)), _first(pm(ids)), rtol=1e-5, atol=1e-5)


def test_counts_equal_peft(family: dict[str, Any]) -> None:
    assert lora_fx.count_parameters(family["gm"]) == tuple(
        family["peft"].get_nb_trainable_parameters())


@pytest.mark.parametrize("variant", ["rslora", "patterns", "dropout"])
def test_config_variants_equal_peft(variant: str) -> None:
    """rsLoRA scale, rank/alpha patterns and dropout (in eval) agree with PEFT's semantics."""
    base = tiny_llama()
    ids = token_ids()
    cfg: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])
    if variant == "rslora":
        cfg["use_rslora"] = True
    if variant == "patterns":
        cfg["rank_pattern"] = {"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}
        cfg["alpha_pattern"] = {"o_proj": 3.0}
    if variant == "dropout":
        cfg["lora_dropout"] = 0.3
    gm = lora_fx.inject(base, (ids,), lora_fx.LoraConfig(**cfg))
    randomize_lora(gm, seed=2)
    gm.eval()
    pm = peft_model_like(base, gm, **cfg)
    with torch.no_grad():
        torch.testing.assert_close(_first(gm(ids)), _first(pm(ids)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_first(lora_fx.merge(gm)(ids)), _first(pm(ids)),
                                   rtol=1e-5, atol=1e-5)
    assert lora_fx.count_parameters(gm) == tuple(pm.get_nb_trainable_parameters())


def test_modules_to_save_round_trip_with_peft(tmp_path: Path) -> None:
    """A trained head is saved the way PEFT saves it, and PEFT loads it back."""
    import peft
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(
        num_hidden_layers=1, hidden_size=32, num_attention_heads=4, intermediate_size=64,
        vocab_size=97, max_position_embeddings=32, num_labels=3)).eval()
    ids = token_ids()
    cfg = dict(r=4, lora_alpha=8, target_modules=["query", "value"],
               modules_to_save=["classifier"])
    gm = lora_fx.inject(base, (ids,), lora_fx.LoraConfig(**cfg))
    randomize_lora(gm, seed=3)
    with torch.no_grad():
        gm.get_parameter("classifier.weight").add_(0.5)
    assert not torch.equal(gm.get_parameter("classifier.weight"), base.classifier.weight)
    lora_fx.save_adapter(gm, tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad")).eval()
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(_first(pm(ids)), _first(gm(ids)), rtol=1e-5, atol=1e-5)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    assert lora_fx.count_parameters(gm) == tuple(ref.get_nb_trainable_parameters())
    back = lora_fx.load_adapter(base, (ids,), tmp_path / "ad").eval()
    with torch.no_grad():
        torch.testing.assert_close(_first(back(ids)), _first(gm(ids)))
