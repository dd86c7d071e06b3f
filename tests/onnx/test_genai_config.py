"""``genai_config.json`` as complete as ORT GenAI's model builder writes it (``onnx.genai``): the
context length from the model, the search defaults from its generation_config.json, the chat
template beside the model where GenAI 0.18 reads it. A tiny HF LLaMA saved with
``save_pretrained`` (random weights), a generation_config.json and a chat template written
here; GenAI's own strict parser (``og.Config``: unknown keys and floats for integers refused)
checks every file written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_fx.onnx.genai import chat_template, search_defaults, write_genai_files
from lora_fx.onnx.kv_cache import DecoderLayout, decoder_layout

transformers = pytest.importorskip("transformers")

POSITIONS = 64
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
GENERATION = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9,
              "repetition_penalty": 1.1, "max_length": 48, "num_beams": 1,
              "early_stopping": "never", "bos_token_id": 1, "eos_token_id": [2, 3],
              "no_repeat_ngram_size": 3.0, "length_penalty": 1, "min_length": None}


def layout(vocab: int = 300) -> DecoderLayout:
    return DecoderLayout(model_type="llama", layers=2, kv_heads=2, head_dim=16, heads=4,
                         hidden=64, vocab=vocab, positions=POSITIONS, position_ids=True,
                         cache_arg="cache", dtype=torch.float32,
                         tokens={"bos_token_id": 1, "eos_token_id": [2, 3], "pad_token_id": 2})


def save_llama(directory: Path, generation: dict[str, Any] | None = GENERATION,
               template: str | None = TEMPLATE) -> torch.nn.Module:
    """A tiny LLaMA (64 positions) with ``generation`` as its generation_config.json and a
    byte-level BPE tokenizer carrying ``template`` (transformers 5 writes chat_template.jinja)."""
    tokenizers = pytest.importorskip("tokenizers")
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=POSITIONS,
                                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(str(directory))
    if generation is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation))
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 10,
                            vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = transformers.GPT2TokenizerFast(tokenizer_object=bpe._tokenizer,
                                         eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(str(directory))
    return model


def parsed_by_genai(directory: Path) -> None:
    og = pytest.importorskip("onnxruntime_genai")
    og.Config(str(directory))  # raises on an unknown key or a mistyped value


def test_config_from_a_saved_model(tmp_path: Path) -> None:
    src, out = tmp_path / "hf", tmp_path / "out"
    out.mkdir()
    save_llama(src)
    model = transformers.LlamaForCausalLM.from_pretrained(str(src))  # as hf:DIR loads it
    copied = write_genai_files(out, decoder_layout(model), "model.onnx", src)
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["context_length"] == POSITIONS
    assert config["model"]["bos_token_id"] == 1 and config["model"]["eos_token_id"] == [2, 3]
    search = config["search"]
    assert {k: search[k] for k in ("do_sample", "temperature", "top_k", "top_p",
                                   "repetition_penalty", "max_length", "no_repeat_ngram_size",
                                   "length_penalty")} == {
        "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9,
        "repetition_penalty": 1.1, "max_length": 48, "no_repeat_ngram_size": 3,
        "length_penalty": 1.0}
    assert isinstance(search["no_repeat_ngram_size"], int)
    assert search["early_stopping"] is True and search["min_length"] == 0  # "never", null
    assert search["past_present_share_buffer"] is False
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(copied)
    assert (out / "chat_template.jinja").read_text() == TEMPLATE
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == POSITIONS  # the builder's fix of 1e30
    parsed_by_genai(out)


def test_defaults_without_generation_config(tmp_path: Path) -> None:
    write_genai_files(tmp_path, layout(), "model.onnx", tmp_path)
    search = json.loads((tmp_path / "genai_config.json").read_text())["search"]
    assert search["max_length"] == POSITIONS and search["do_sample"] is False
    assert search["top_k"] == 50 and search["temperature"] == 1.0
    parsed_by_genai(tmp_path)


def test_lengths_capped_at_the_context(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"max_length": 4096, "min_length": 100, "top_k": 7.5, "temperature": True}))
    assert search_defaults(tmp_path, POSITIONS) == {"max_length": POSITIONS}
    (tmp_path / "generation_config.json").write_text("{not json")
    assert search_defaults(tmp_path, POSITIONS) == {}


@pytest.mark.parametrize("form", ["tokenizer_config string", "tokenizer_config list",
                                  "chat_template.json", "none"])
def test_chat_template_forms(tmp_path: Path, form: str) -> None:
    """GenAI 0.18 reads chat_template.jinja or tokenizer_config.json's string; the other forms
    are written out as chat_template.jinja ("default" of a named list)."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    tokenizer_config: dict[str, Any] = {"model_max_length": 1e30}
    if form == "tokenizer_config string":
        tokenizer_config["chat_template"] = TEMPLATE
    elif form == "tokenizer_config list":
        tokenizer_config["chat_template"] = [{"name": "tool_use", "template": "tools"},
                                             {"name": "default", "template": TEMPLATE}]
    elif form == "chat_template.json":
        (src / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    (src / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    written = form in ("tokenizer_config list", "chat_template.json")
    assert (chat_template(src) == TEMPLATE) is written
    copied = write_genai_files(out, layout(), "model.onnx", src)
    assert ("chat_template.jinja" in copied) is written
    assert (out / "chat_template.jinja").is_file() is written
    if written:
        assert (out / "chat_template.jinja").read_text() == TEMPLATE
    kept = json.loads((out / "tokenizer_config.json").read_text())
    string = form == "tokenizer_config string"  # a list would stop GenAI's tokenizer loading
    assert kept.get("chat_template") == (TEMPLATE if string else None)
    assert kept["model_max_length"] == POSITIONS


def test_genai_applies_the_exported_folders_chat_template(tmp_path: Path) -> None:
    """A KV-cache export from the saved directory: GenAI loads the folder, takes its search
    defaults and formats a chat with the model's template."""
    og = pytest.importorskip("onnxruntime_genai")
    from lora_fx.api import export_kv

    src, out = tmp_path / "hf", tmp_path / "kv" / "model.onnx"
    model = save_llama(src)
    export_kv(model, out, source=src, verify=False)
    genai = og.Model(str(out.parent))
    tokenizer = og.Tokenizer(genai)
    chat = json.dumps([{"role": "user", "content": "hello"}])
    assert tokenizer.apply_chat_template(chat, add_generation_prompt=True) == \
        "<|user|>hello<|assistant|>"
    config = json.loads((out.parent / "genai_config.json").read_text())
    assert config["search"]["top_k"] == 20 and config["model"]["context_length"] == POSITIONS
    # a source whose tokenizer_config.json holds named templates: GenAI loads the copy
    named = tmp_path / "named"
    named.mkdir()
    (named / "tokenizer.json").write_text((src / "tokenizer.json").read_text())
    tokenizer_config = json.loads((src / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = [
        {"name": "default", "template": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"},
        {"name": "tool_use", "template": "tools"}]
    (named / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (out.parent / "chat_template.jinja").unlink()
    write_genai_files(out.parent, decoder_layout(model), out.name, named)
    tokenizer = og.Tokenizer(og.Model(str(out.parent)))
    assert tokenizer.apply_chat_template(chat, add_generation_prompt=False) == "[hello]"
