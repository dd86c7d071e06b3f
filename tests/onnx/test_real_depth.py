"""Verification at real depth: a LLaMA of a real 135M decoder's shape (30 layers, hidden 576,
intermediate 1536, 9/3 heads, vocabulary 49152, tied embeddings; a default-style config with
random weights, initializer_range 0.02) passes lorafx's own verification merged, unmerged and
with its KV cache, while a file whose adapter was lost (B zeroed) or mis-scaled (B doubled)
fails it. The reference is PEFT's model with the same random A and B (B != 0).

Lean on purpose: each export of this model costs about a minute on two cores.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_fx
from lora_fx.onnx.export import export_kv
from lora_fx.onnx.limits import judge
from lora_fx.ort.adapters import convert_adapter
from lora_fx.ort.generate import Folder, OrtDecoder

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

SHAPE = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
         "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
         "tie_word_embeddings": True, "initializer_range": 0.02,
         "max_position_embeddings": 2048}


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("real_depth")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).eval()
    tuned = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    tuned.save_pretrained(str(tmp / "a1"))
    prompts = torch.randint(0, SHAPE["vocab_size"], (1, 12), generator=g)
    with torch.no_grad():
        want = tuned.eval()(prompts).logits
        without = base(prompts).logits
    return {"tmp": tmp, "base": base, "prompts": prompts, "want": want, "base_logits": without}


def scaled_adapter(src: Path, dst: Path, factor: float) -> Path:
    """A copy of the PEFT adapter ``src`` with every lora_B multiplied by ``factor``."""
    dst.mkdir()
    tensors = load_file(str(src / "adapter_model.safetensors"))
    save_file({k: v * factor if "lora_B" in k else v for k, v in tensors.items()},
              str(dst / "adapter_model.safetensors"))
    (dst / "adapter_config.json").write_text(json.dumps(
        json.loads((src / "adapter_config.json").read_text())))
    return dst


def test_plain_merged_export_passes_at_real_depth(real: dict[str, Any]) -> None:
    ids = real["prompts"]
    gm = lora_fx.load_adapter(real["base"], (ids,), real["tmp"] / "a1")
    report = lora_fx.export_onnx(gm, (ids,), real["tmp"] / "merged.onnx", merge=True)
    assert report.checks and all(c.ok and not c.blind for c in report.checks)
    assert all(c.basis and c.effect and c.effect > 0.1 for c in report.checks)


def test_kv_merged_export_passes_at_real_depth(real: dict[str, Any]) -> None:
    report = export_kv(real["base"], real["tmp"] / "kv_merged" / "model.onnx",
                       adapter=real["tmp"] / "a1", merge=True)
    assert {c.name for c in report.checks} == {"decode", "prefill"}
    assert all(c.ok and c.effect for c in report.checks)


def test_kv_unmerged_passes_and_a_lost_or_doubled_adapter_fails(real: dict[str, Any]) -> None:
    tmp = real["tmp"]
    report = export_kv(real["base"], tmp / "kv" / "model.onnx", adapter=tmp / "a1",
                       merge=False, adapter_name="a1")
    assert {c.name for c in report.checks} == {"decode", "prefill", "decode+adapter",
                                              "prefill+adapter"}
    assert all(c.ok for c in report.checks)
    dec = OrtDecoder(Folder.open(tmp / "kv"))
    feeds = dec.prefill_feeds(real["prompts"].tolist())
    verdicts = {}
    for label, factor in (("as trained", 1.0), ("B zeroed", 0.0), ("B doubled", 2.0)):
        adapter = tmp / f"{label}.onnx_adapter"
        convert_adapter(scaled_adapter(tmp / "a1", tmp / label, factor), adapter,
                        model=tmp / "kv" / "model.onnx")
        logits = dec.step(feeds, dec.load_adapter(adapter))[0].numpy()
        verdicts[label] = judge(label, [logits], [real["want"]], base=[real["base_logits"]])
    assert verdicts["as trained"].ok, verdicts["as trained"]
    assert not verdicts["B zeroed"].ok and not verdicts["B doubled"].ok, verdicts
