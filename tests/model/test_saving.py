"""Saving an injected model's adapter (lora_fx/model/saving.py): where it goes, what it says."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

import lora_fx
from tests.helpers import tiny_mlp


def test_save_adapter_makes_missing_parent_folders(tmp_path: Path) -> None:
    model, ex = tiny_mlp()
    gm = lora_fx.inject(model, ex, lora_fx.LoraConfig(r=2, target_modules=["w_in"]))
    written = lora_fx.save_adapter(gm, tmp_path / "a" / "b" / "adapter")
    assert written == tmp_path / "a" / "b" / "adapter"
    assert set(load_file(str(written / "adapter_model.safetensors"))) == {
        "base_model.model.w_in.lora_A.weight", "base_model.model.w_in.lora_B.weight"}
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["adapter"]


def test_an_hf_models_directory_is_recorded_as_peft_does(tmp_path: Path) -> None:
    import json

    import peft
    import transformers

    from tests.helpers import tiny_gpt2, token_ids

    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    base = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "gpt2"))
    ids = token_ids()
    config = lora_fx.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    lora_fx.save_adapter(lora_fx.inject(base, (ids,), config), tmp_path / "ours")
    pm = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "gpt2")),
                             peft.LoraConfig(r=2, target_modules=["c_attn"]))
    pm.save_pretrained(str(tmp_path / "peft"))

    def recorded(name: str) -> object:
        return json.loads((tmp_path / name / "adapter_config.json").read_text())[
            "base_model_name_or_path"]

    assert recorded("ours") == recorded("peft") == str(tmp_path / "gpt2")
    # an adapter saved with no record (lorafx before this) gets it when saved again (train)
    (tmp_path / "old").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "old" / name).write_bytes((tmp_path / "ours" / name).read_bytes())
    text = (tmp_path / "old" / "adapter_config.json").read_text()
    (tmp_path / "old" / "adapter_config.json").write_text(
        text.replace(json.dumps(str(tmp_path / "gpt2")), "null"))
    assert recorded("old") is None
    gm = lora_fx.load_adapter(base, (ids,), tmp_path / "old")
    lora_fx.save_adapter(gm, tmp_path / "old", force=True)
    assert recorded("old") == str(tmp_path / "gpt2")
    # a name the config gives wins; a plain module has none to record
    named = lora_fx.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                               base_model_name_or_path="gpt2")
    lora_fx.save_adapter(lora_fx.inject(base, (ids,), named), tmp_path / "named")
    model, ex = tiny_mlp()
    lora_fx.save_adapter(lora_fx.inject(model, ex, lora_fx.LoraConfig(
        r=2, target_modules=["w_in"])), tmp_path / "plain")
    assert (recorded("named"), recorded("plain")) == ("gpt2", None)
