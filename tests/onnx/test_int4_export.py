"""``dtype="int4" / "int8"`` exports: base MatMuls become MatMulNBits, LoRA factors stay float
and overridable, a merged file reports how much of its adapter survived rounding (and warns,
naming --no-merge, where it did not), and a KV decoder in int4 decodes in ORT GenAI.

A tiny default-style LLaMA (hidden 64, 2 layers) with a PEFT adapter of random A and B; the
survival reference is PEFT's fp32 model against the base model."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import lora_fx
from lora_fx.errors import LoraFxWarning
from lora_fx.onnx.export import export_kv, export_onnx

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, initializer_range=0.1)
    return transformers.LlamaForCausalLM(config).eval()


def adapter(base: torch.nn.Module, directory: Path, scale: float) -> Path:
    """A PEFT adapter on q/v with random A and B times ``scale``."""
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("int4")
    base = llama()
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(2))
    return {"tmp": tmp, "base": base, "ids": ids,
            "strong": adapter(base, tmp / "strong", 0.5),
            "faint": adapter(base, tmp / "faint", 1e-3)}


def histogram(report: Any) -> dict[str, int]:
    return {k.split("::")[1]: v for k, v in report.op_histogram.items()}


@pytest.mark.parametrize("dtype", ["int4", "int8"])
def test_merged_quantized_file_keeps_a_strong_adapter(setup: dict[str, Any], dtype: str) -> None:
    gm = lora_fx.load_adapter(setup["base"], (setup["ids"],), setup["strong"])
    report = export_onnx(gm, (setup["ids"],), setup["tmp"] / f"m_{dtype}.onnx", dtype=dtype)
    ops = histogram(report)
    assert ops.get("MatMulNBits", 0) >= 14 and report.dtype == dtype  # 7 per layer
    assert report.survival is not None and not report.survival.lost, report.survival
    assert report.survival.cosine > 0.9 and all(c.ok for c in report.checks)


def test_an_adapter_lost_in_int4_rounding_is_warned_about(setup: dict[str, Any]) -> None:
    gm = lora_fx.load_adapter(setup["base"], (setup["ids"],), setup["faint"])
    with pytest.warns(LoraFxWarning, match="did not survive int4.*--no-merge"):
        report = export_onnx(gm, (setup["ids"],), setup["tmp"] / "faint.onnx", dtype="int4")
    assert report.survival is not None and report.survival.lost


def test_unmerged_int4_keeps_float_factors_as_inputs(setup: dict[str, Any]) -> None:
    import onnx

    gm = lora_fx.load_adapter(setup["base"], (setup["ids"],), setup["strong"])
    path = setup["tmp"] / "u4.onnx"
    report = export_onnx(gm, (setup["ids"],), path, merge=False, dtype="int4")
    proto = onnx.load(str(path), load_external_data=False)
    lora = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input
            if i.name.endswith((".lora_A.weight", ".lora_B.weight"))}
    assert len(lora) == 8 and set(lora.values()) == {onnx.TensorProto.FLOAT}
    assert histogram(report)["MatMulNBits"] >= 14 and report.survival is None
    effects = [c.effect for c in report.checks if c.effect]
    assert effects and all(c.ok for c in report.checks)


def test_int4_kv_decoder_decodes_in_genai(setup: dict[str, Any]) -> None:
    og = pytest.importorskip("onnxruntime_genai")
    out = setup["tmp"] / "kv4" / "model.onnx"
    report = export_kv(setup["base"], out, adapter=setup["strong"], merge=True, dtype="int4")
    assert histogram(report)["MatMulNBits"] >= 14
    assert report.survival is not None and not report.survival.lost
    model = og.Model(str(out.parent))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=12, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens([[5, 17, 33, 101]])
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) == 12
