"""``genai_config.json`` for a KV-cache export, and the tokenizer files beside it.

ONNX Runtime GenAI (``onnxruntime_genai.Model(DIR)``) reads the decoder's file name, its input
and output names (``%d`` = layer), heads, KV heads, head size, layers, vocabulary, context
length and bos / eos / pad ids from ``DIR/genai_config.json``. ``past_present_share_buffer`` is
false: each step's ``present.{i}`` (past + new tokens) is a new tensor fed back as the next
``past_key_values.{i}``, which is what the exported graph computes (a concatenation); with a
shared buffer GenAI would hand the model a [batch, kv_heads, max_length, head_size] past.

As complete as ORT GenAI's model builder writes it (``builders/base.py`` ``make_genai_config``,
``save_processing``): the context length is the model's (``max_position_embeddings``); the
search defaults are the model directory's ``generation_config.json`` where it sets them (do_sample,
temperature, top_k, top_p, repetition_penalty, num_beams, ..., max_length capped at the context
length; the builder takes only the first four from it), else GenAI's defaults with max_length =
context length; the copied ``tokenizer_config.json`` gets ``model_max_length`` = the context length
(HF's 1e30 "no limit" is no JSON integer), as the builder's; the chat template is beside the
model as GenAI 0.18 reads it: ``chat_template.jinja`` (copied), or ``tokenizer_config.json``'s
string ``chat_template``; a named-template list there (which GenAI's tokenizer refuses: it is
dropped from the copy) or a processor's ``chat_template.json`` is written out as
``chat_template.jinja`` (its "default" entry, else the first).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..deploy_format import (
    CHAT_TEMPLATE,
    CHAT_TEMPLATE_JSON,
    GENAI_CONFIG,
    GENAI_SEARCH_KEYS,
    GENERATION_CONFIG,
    TOKENIZER_CONFIG,
    TOKENIZER_FILES,
)
from ..fileio import atomic_path
from .kv_cache import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    PAST_KEY,
    PAST_VALUE,
    POSITION_IDS,
    PRESENT_KEY,
    PRESENT_VALUE,
    DecoderLayout,
)

# model types ORT GenAI drives as a plain decoder with separate key / value caches (its
# ModelType::IsLLM list, 0.18); any other decoder is declared "decoder", GenAI's generic type.
# Not "gpt2": GenAI's GPT-2 model reads one combined past per layer (past_%d), not ours.
GENAI_TYPES = frozenset({"chatglm", "decoder", "gemma", "gemma2", "granite", "llama",
                         "mistral", "nemotron", "olmo", "phi", "phi3", "qwen2", "qwen3"})


def genai_config(layout: DecoderLayout, filename: str,
                 search: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``genai_config.json`` content for ``layout`` exported to ``filename``; ``search``
    overrides the search defaults (``search_defaults``)."""
    inputs = {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK,
              "past_key_names": PAST_KEY, "past_value_names": PAST_VALUE}
    if layout.position_ids:
        inputs["position_ids"] = POSITION_IDS
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": filename, "head_size": layout.head_dim, "hidden_size": layout.hidden,
        "num_attention_heads": layout.heads, "num_key_value_heads": layout.kv_heads,
        "num_hidden_layers": layout.layers, "inputs": inputs,
        "outputs": {"logits": LOGITS, "present_key_names": PRESENT_KEY,
                    "present_value_names": PRESENT_VALUE}}
    model: dict[str, Any] = {
        "type": layout.model_type if layout.model_type in GENAI_TYPES else "decoder",
        "vocab_size": layout.vocab, "context_length": layout.positions, "decoder": decoder}
    for key, value in layout.tokens.items():
        if value is not None:
            model[key] = list(value) if isinstance(value, (list, tuple)) else int(value)
    defaults = {"max_length": layout.positions, "min_length": 0, "do_sample": False,
                "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
                "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0,
                "length_penalty": 1.0, "early_stopping": True, "no_repeat_ngram_size": 0,
                "diversity_penalty": 0.0}
    return {"model": model, "search": defaults | dict(search or {})}


def write_genai_files(directory: Path, layout: DecoderLayout, filename: str,
                      source: str | Path | None = None) -> list[str]:
    """Write ``directory/genai_config.json`` (search defaults from ``source``'s
    generation_config.json) and copy the tokenizer files that ``source`` (the model's
    ``save_pretrained`` directory) has, its chat template as GenAI reads it (module docstring);
    returns the names of the files copied or written beside the config."""
    src = Path(source) if source is not None else None
    search = search_defaults(src, layout.positions) if src is not None else {}
    with atomic_path(directory / GENAI_CONFIG) as tmp:
        tmp.write_text(json.dumps(genai_config(layout, filename, search), indent=2) + "\n")
    copied: list[str] = []
    if src is None:
        return copied
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and (src / name).resolve() != (directory / name).resolve():
            with atomic_path(directory / name) as tmp:
                if name == TOKENIZER_CONFIG:
                    _copy_tokenizer_config(src / name, tmp, layout.positions)
                else:
                    shutil.copyfile(src / name, tmp)
            copied.append(name)
    template = None if CHAT_TEMPLATE in copied else chat_template(src)
    if template is not None and (directory / CHAT_TEMPLATE).resolve() != (
            src / CHAT_TEMPLATE).resolve():
        with atomic_path(directory / CHAT_TEMPLATE) as tmp:
            tmp.write_text(template)
        copied.append(CHAT_TEMPLATE)
    return copied


def _read_json(path: Path) -> Any:
    """``path`` parsed, or None when it is missing or no JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def search_defaults(source: Path, context_length: int) -> dict[str, Any]:
    """The ``search`` entries that ``source/generation_config.json`` sets (keys of
    ``GENAI_SEARCH_KEYS`` with a value of the right type; max_length capped at
    ``context_length``, a min_length past it dropped); {} without the file."""
    data = _read_json(source / GENERATION_CONFIG)
    out: dict[str, Any] = {}
    if not isinstance(data, dict):
        return out
    for key, kind in GENAI_SEARCH_KEYS.items():
        value = data.get(key)
        if isinstance(value, bool) or value is None:
            if kind is bool and isinstance(value, bool):
                out[key] = value
        elif kind is int and isinstance(value, (int, float)) and float(value).is_integer():
            out[key] = int(value)
        elif kind is float and isinstance(value, (int, float)):
            out[key] = float(value)
    if "max_length" in out:
        out["max_length"] = max(1, min(out["max_length"], context_length))
    if not 0 <= out.get("min_length", 0) <= out.get("max_length", context_length):
        del out["min_length"]  # past the longest sequence: no minimum GenAI could reach
    return out


def chat_template(source: Path) -> str | None:
    """A chat template of ``source`` that GenAI would not find itself: a list of named
    templates in tokenizer_config.json, or a processor's chat_template.json ("default", else
    the first); None when there is none or it is already where GenAI reads it."""
    config = _read_json(source / TOKENIZER_CONFIG)
    found = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(found, str):
        return None  # GenAI reads tokenizer_config.json's string itself
    if found is None:
        processor = _read_json(source / CHAT_TEMPLATE_JSON)
        found = processor.get("chat_template") if isinstance(processor, dict) else None
    if isinstance(found, list):
        named = {t.get("name"): t.get("template") for t in found if isinstance(t, dict)}
        found = named.get("default", next(iter(named.values()), None))
    return found if isinstance(found, str) and found else None


def _copy_tokenizer_config(src: Path, dst: Path, context_length: int) -> None:
    """Copy tokenizer_config.json with ``model_max_length`` = the context length, and without a
    chat_template that is no string (GenAI 0.18's tokenizer refuses to load a list of named
    templates; ``chat_template`` writes it out as chat_template.jinja)."""
    data = _read_json(src)
    if not isinstance(data, dict):
        shutil.copyfile(src, dst)
        return
    data["model_max_length"] = context_length
    if not isinstance(data.get("chat_template", ""), str):
        del data["chat_template"]
    dst.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
