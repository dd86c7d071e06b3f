"""``genai_config.json`` for a KV-cache export, and the tokenizer files beside it.

ONNX Runtime GenAI (``onnxruntime_genai.Model(DIR)``) reads the decoder's file name, its input
and output names (``%d`` = layer), heads, KV heads, head size, layers, vocabulary, context
length and bos / eos / pad ids from ``DIR/genai_config.json``. ``past_present_share_buffer`` is
false: each step's ``present.{i}`` (past + new tokens) is a new tensor fed back as the next
``past_key_values.{i}``, which is what the exported graph computes (a concatenation); with a
shared buffer GenAI would hand the model a [batch, kv_heads, max_length, head_size] past.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..deploy_format import GENAI_CONFIG, TOKENIZER_FILES
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


def genai_config(layout: DecoderLayout, filename: str) -> dict[str, Any]:
    """The ``genai_config.json`` content for ``layout`` exported to ``filename``."""
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
    search = {"max_length": layout.positions, "min_length": 0, "do_sample": False,
              "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
              "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0,
              "length_penalty": 1.0, "early_stopping": True, "no_repeat_ngram_size": 0,
              "diversity_penalty": 0.0}
    return {"model": model, "search": search}


def write_genai_files(directory: Path, layout: DecoderLayout, filename: str,
                      source: str | Path | None = None) -> list[str]:
    """Write ``directory/genai_config.json`` and copy the tokenizer files that ``source`` (the
    model's ``save_pretrained`` directory) has; returns the names of the files copied."""
    with atomic_path(directory / GENAI_CONFIG) as tmp:
        tmp.write_text(json.dumps(genai_config(layout, filename), indent=2) + "\n")
    copied: list[str] = []
    if source is None:
        return copied
    src = Path(source)
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and (src / name).resolve() != (directory / name).resolve():
            with atomic_path(directory / name) as tmp:
                shutil.copyfile(src / name, tmp)
            copied.append(name)
    return copied
