"""A MODEL file whose example inputs have batch 1: a tiny LLaMA from a config."""

from __future__ import annotations

import torch
from torch import nn


def build_model() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, vocab_size=97,
                      max_position_embeddings=64, use_cache=False, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randint(1, 97, (1, 7), generator=torch.Generator().manual_seed(0)),)
