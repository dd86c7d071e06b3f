"""What the DDP and FSDP tests share: the models, the batches, the loss, the injected start."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from tests.helpers import gpt3_small

STEPS, GLOBAL_BATCH, SEQ, VOCAB = 3, 8, 8, 97


def _gpt3_small() -> tuple[nn.Module, list[str]]:
    return gpt3_small(), ["q_proj", "v_proj"]


def _hf_gpt2() -> tuple[nn.Module, list[str]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32,
                     use_cache=False, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg), ["c_attn", "c_proj"]


MODELS = {"gpt3_small": _gpt3_small, "hf_gpt2": _hf_gpt2}


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ),
                         generator=torch.Generator().manual_seed(100 + step))


def lm_loss(out: Any, ids: torch.Tensor) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def injected(name: str) -> tuple[nn.Module, nn.Module]:
    """(base, injected) with random A and B, identical on every rank (same seeds)."""
    base, targets = MODELS[name]()
    gm = lora_fx.inject(base, (batch(0)[:2],), lora_fx.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in lora_fx.lora_parameters(gm):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return base, gm

