"""Models for the benchmarks, built from configs with random weights (nothing is downloaded).

Full size: GPT-2 small (12 x 768, vocab 50257), a LLaMA-shaped model (6 x 768, grouped-query
attention, SwiGLU, vocab 32000; smaller than LLaMA-7B so that it runs on a laptop CPU) and
BERT base (12 x 768). ``quick`` gives two-layer versions of the same architectures.
Dropout is 0 everywhere so that every implementation does the same work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Spec:
    name: str
    kind: str                 # "gpt2", "llama", "bert"
    targets: tuple[str, ...]  # PEFT's default target_modules for the architecture
    vocab: int
    heads: int
    hidden: int
    layers: int


FULL = {
    "gpt2": Spec("gpt2-small", "gpt2", ("c_attn",), 50257, 12, 768, 12),
    "llama": Spec("llama-6x768", "llama", ("q_proj", "v_proj"), 32000, 12, 768, 6),
    "bert": Spec("bert-base", "bert", ("query", "value"), 30522, 12, 768, 12),
}
QUICK = {
    "gpt2": Spec("gpt2-tiny", "gpt2", ("c_attn",), 1000, 4, 64, 2),
    "llama": Spec("llama-tiny", "llama", ("q_proj", "v_proj"), 1000, 4, 64, 2),
    "bert": Spec("bert-tiny", "bert", ("query", "value"), 1000, 4, 64, 2),
}


def spec(kind: str, quick: bool) -> Spec:
    return (QUICK if quick else FULL)[kind]


def build(s: Spec, seed: int = 0) -> nn.Module:
    """The model of ``s`` in eval mode with seeded random weights."""
    torch.manual_seed(seed)
    if s.kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(
            n_layer=s.layers, n_embd=s.hidden, n_head=s.heads, vocab_size=s.vocab,
            n_positions=1024, use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0)).eval()
    if s.kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(
            num_hidden_layers=s.layers, hidden_size=s.hidden, num_attention_heads=s.heads,
            num_key_value_heads=kv_heads(s.heads), intermediate_size=s.hidden * 8 // 3,
            vocab_size=s.vocab, max_position_embeddings=1024, use_cache=False,
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()
    if s.kind == "bert":
        from transformers import BertConfig, BertModel

        return BertModel(BertConfig(
            num_hidden_layers=s.layers, hidden_size=s.hidden, num_attention_heads=s.heads,
            intermediate_size=4 * s.hidden, vocab_size=s.vocab, max_position_embeddings=512,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
            add_pooling_layer=False).eval()
    raise ValueError(s.kind)


def kv_heads(heads: int) -> int:
    """Grouped-query attention's key/value heads: the largest divisor of ``heads`` that is at
    most a third of it (4 of 12, 16 of 64), 1 for small ``heads``."""
    return max(d for d in range(1, max(1, heads // 3) + 1) if heads % d == 0)


def ids(s: Spec, batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, s.vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(out: Any) -> torch.Tensor:
    """The main output tensor of a Hugging Face model output (or of a tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out[0]


def causal_lm_loss(out: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: the same loss for every implementation."""
    lg = logits(out)
    return nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]).float(),
                                       tokens[:, 1:].reshape(-1))
