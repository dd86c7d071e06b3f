"""The built-in ``hf:DIR`` plugin: save_pretrained directories become MODELs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import lora_fx
from lora_fx.errors import LoraFxError, LoraFxWarning
from lora_fx.load.model import load_model, plugins
from lora_fx.plugins import hf
from tests.helpers import tiny_bert, tiny_gpt2

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models saved with save_pretrained, and the originals' outputs."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        num_layers=1, num_decoder_layers=1, d_model=16, d_kv=4, num_heads=4, d_ff=32,
        vocab_size=50, decoder_start_token_id=0, pad_token_id=0))
    cls = transformers.BertForSequenceClassification(transformers.BertConfig(
        num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
        vocab_size=50, max_position_embeddings=16, num_labels=3))
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
        image_size=8, patch_size=4, num_labels=2))
    out = {}
    for name, model in [("gpt2", tiny_gpt2()), ("bert", tiny_bert()), ("t5", t5),
                        ("cls", cls), ("vit", vit)]:
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def test_hf_is_a_registered_plugin() -> None:
    assert plugins()["hf"].load() is hf.plugin


def test_loads_task_head_with_inputs_from_config(saved: dict[str, Path]) -> None:
    loaded = load_model(f"hf:{saved['gpt2']}")
    model = loaded.module
    assert type(model).__name__ == "GPT2LMHeadModel" and not model.training
    assert model.config.use_cache is False
    assert loaded.extras["attn_implementation"] == "sdpa"
    # forward(input_ids, cache, attention_mask): None fills the gap
    assert loaded.extras["input_names"] == ["input_ids", "cache", "attention_mask"]
    ids, gap, mask = loaded.example_inputs
    assert gap is None and ids.shape == mask.shape == (2, 8) and int(ids.max()) < 97
    reference = tiny_gpt2()  # the weights that were saved
    with torch.no_grad():
        torch.testing.assert_close(model(*loaded.example_inputs).logits,
                                   reference(input_ids=ids, attention_mask=mask).logits)
    assert loaded.loss_fn is hf.causal_lm_loss
    auto = torch.export.Dim.AUTO
    assert loaded.dynamic_shapes == ({0: auto, 1: auto}, None, {0: auto, 1: auto})


def test_t5_gets_eager_attention_and_decoder_inputs(saved: dict[str, Path]) -> None:
    loaded = load_model(f"hf:{saved['t5']}")
    assert loaded.module.config._attn_implementation == "eager"
    assert loaded.extras["input_names"] == ["input_ids", "attention_mask", "decoder_input_ids"]
    assert loaded.example_inputs[2].shape == (2, 6)
    assert loaded.loss_fn is hf.token_loss


def test_vision_model_gets_pixel_values(saved: dict[str, Path]) -> None:
    loaded = load_model(f"hf:{saved['vit']}")
    (pixels,) = loaded.example_inputs
    assert pixels.shape == (2, 3, 8, 8) and pixels.dtype == torch.float32
    assert loaded.dynamic_shapes == ({0: torch.export.Dim.AUTO},)
    assert loaded.loss_fn is hf.classification_loss


def test_task_losses_equal_transformers_own(saved: dict[str, Path]) -> None:
    gpt2 = load_model(f"hf:{saved['gpt2']}")
    ids, _, mask = gpt2.example_inputs
    ids = ids.clone()
    ids[0, :2] = -100  # ignored positions
    with torch.no_grad():
        out = gpt2.module(input_ids=gpt2.example_inputs[0], attention_mask=mask, labels=ids)
        torch.testing.assert_close(hf.causal_lm_loss(out, ids), out.loss)
        cls = load_model(f"hf:{saved['cls']}")
        labels = torch.tensor([2, 0])
        out = cls.module(*cls.example_inputs, labels=labels)
        torch.testing.assert_close(cls.loss_fn(out, labels), out.loss)  # type: ignore[misc]
        t5 = load_model(f"hf:{saved['t5']}")
        labels = t5.example_inputs[2]
        out = t5.module(input_ids=t5.example_inputs[0], labels=labels)
        torch.testing.assert_close(hf.token_loss(out, labels), out.loss)
    assert hf.task_loss("BertModel") is None
    assert hf.task_loss("BertForSequenceClassification",
                        transformers.BertConfig(num_labels=1)) is hf.regression_loss


def test_meta_reads_no_weights(saved: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "gpt2"
    shutil.copytree(saved["gpt2"], d)
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    loaded = load_model(f"hf:{d}", meta=True)
    assert all(p.is_meta for p in loaded.module.parameters())
    assert all(x is None or x.is_meta for x in loaded.example_inputs)
    with pytest.raises(LoraFxError, match="save_pretrained"):
        load_model(f"hf:{d}")  # the real load reads the broken weights and says so


def test_inject_dry_run_on_meta_through_the_cli(saved: dict[str, Path]) -> None:
    from click.testing import CliRunner

    from lora_fx.cli.main import cli

    result = CliRunner().invoke(cli, ["inject", f"hf:{saved['bert']}", "-t", "query", "-t",
                                      "value", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [s["name"] for s in data["sites"]] == [
        f"encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")]
    assert data["output"] is None


def test_missing_weights_warn(saved: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "headless"
    shutil.copytree(saved["bert"], d)  # BertModel weights ...
    config = json.loads((d / "config.json").read_text())
    config["architectures"] = ["BertForSequenceClassification"]  # ... read as a classifier
    (d / "config.json").write_text(json.dumps(config))
    with pytest.warns(LoraFxWarning, match="initialized randomly"):
        loaded = load_model(f"hf:{d}")
    assert type(loaded.module).__name__ == "BertForSequenceClassification"


@pytest.mark.parametrize("problem, match", [
    ("no_dir", "no config.json"),
    ("unknown_arch", "not a transformers class"),
    ("audio", "input_ids and pixel_values"),
])
def test_refusals_say_what_to_do(problem: str, match: str, tmp_path: Path) -> None:
    d = tmp_path / "model"
    if problem == "unknown_arch":
        cfg = transformers.BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                      intermediate_size=32)
        cfg.architectures = ["MyCustomBert"]
        cfg.save_pretrained(d)
    elif problem == "audio":
        transformers.Wav2Vec2Config(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                    intermediate_size=32).save_pretrained(d)
    with pytest.raises(LoraFxError, match=match) as err:
        load_model(f"hf:{d}", meta=True)
    assert "model.py" in str(err.value) or "save_pretrained" in str(err.value)


def test_unknown_plugin_lists_installed() -> None:
    with pytest.raises(LoraFxError, match="installed plugins are .*hf"):
        load_model("nosuchplugin:whatever")


def test_injects_the_loaded_model(saved: dict[str, Path]) -> None:
    loaded = load_model(f"hf:{saved['cls']}")
    cfg = lora_fx.LoraConfig(r=2, target_modules=["query", "value", "classifier"])
    gm = lora_fx.inject(loaded.module, loaded.example_inputs, cfg, loaded.dynamic_shapes)
    assert sorted(lora_fx.branches(gm)) == ["bert.encoder.layer.0.attention.self.query",
                                            "bert.encoder.layer.0.attention.self.value",
                                            "classifier"]
    with torch.no_grad():  # B = 0: the injected model is the base
        assert torch.equal(gm(*loaded.example_inputs).logits,
                           loaded.module(*loaded.example_inputs).logits)
