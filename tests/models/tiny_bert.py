"""A MODEL file for CLI tests: a tiny BERT with a classification head, from a config."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def build_model() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                     intermediate_size=64, vocab_size=97, max_position_embeddings=32,
                     num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(0)),)


def train_batches() -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    while True:
        ids = torch.randint(1, 97, (8, 8), generator=g)
        yield (ids,), (ids[:, 0] > 48).long()


def loss_fn(output: object, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.logits, target)  # type: ignore[attr-defined]
