"""GPT-3- and RoBERTa-shaped MODEL files for planning at the LoRA paper's scale.

Factories (``lorafx inject examples/gpt3_175b/model.py:FACTORY -t q_proj -t v_proj -r 8
--dry-run --json``):

- ``build_model`` / ``gpt3_175b``: GPT-3 175B's shape (96 layers, d_model 12288, 96 heads,
  d_ff 4·d_model, vocabulary 50257, context 2048) in plain PyTorch, with separate ``q_proj``,
  ``k_proj``, ``v_proj`` and ``out_proj`` as in the LoRA paper's W_q, W_k, W_v, W_o. Its 175B
  fp32 weights (700 GB) only fit on the meta device: ``--dry-run`` builds it there.
- ``gpt3_small``: the same code at 2 layers, d_model 64 (for tests that run it).
- ``roberta_base`` / ``roberta_large``: Hugging Face ``RobertaModel`` from a config (random
  weights, nothing downloaded); their attention projections are ``query``/``key``/``value``.

The LoRA paper's trainable counts (r on W_q and W_v, each site adds r·(d_in + d_out)):
GPT-3 r=1: 96·2·(12288 + 12288) = 4,718,592; r=8: 37,748,736; RoBERTa-base r=8:
12·2·8·(768 + 768) = 294,912; RoBERTa-large r=8: 24·2·8·(1024 + 1024) = 786,432.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Causal multi-head self-attention: softmax(Q Kᵀ / √d_head + mask) V, then W_o."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        hd = d // self.heads
        q = self.q_proj(x).view(b, t, self.heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.heads, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.heads, hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + W₂ gelu(W₁ ln(x))."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln_2 = nn.LayerNorm(d)
        self.fc_in = nn.Linear(d, 4 * d)
        self.fc_out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.fc_out(F.gelu(self.fc_in(self.ln_2(x))))


class GPT(nn.Module):
    """Decoder-only language model with a head tied to the token embedding (as GPT-3)."""

    def __init__(self, layers: int, d: int, heads: int, vocab: int = 50257,
                 context: int = 2048) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)


def gpt3_175b() -> nn.Module:
    """GPT-3 175B (Brown et al., 2020, table 2.1): 96 layers, d_model 12288, 96 heads."""
    return GPT(layers=96, d=12288, heads=96)


def gpt3_small() -> nn.Module:
    """The same architecture at toy size (2 layers, d_model 64, vocabulary 97)."""
    torch.manual_seed(0)
    return GPT(layers=2, d=64, heads=4, vocab=97, context=32)


build_model = gpt3_175b


def _roberta(layers: int, d: int, heads: int) -> nn.Module:
    from transformers import RobertaConfig, RobertaModel

    cfg = RobertaConfig(num_hidden_layers=layers, hidden_size=d, num_attention_heads=heads,
                        intermediate_size=4 * d, vocab_size=50265, max_position_embeddings=514,
                        type_vocab_size=1, pad_token_id=1)
    return RobertaModel(cfg, add_pooling_layer=False).eval()


def roberta_base() -> nn.Module:
    """RoBERTa-base's shape (12 layers, d 768, 12 heads), random weights."""
    return _roberta(12, 768, 12)


def roberta_large() -> nn.Module:
    """RoBERTa-large's shape (24 layers, d 1024, 16 heads), random weights."""
    return _roberta(24, 1024, 16)


def example_inputs() -> tuple[torch.Tensor, ...]:
    """Token ids [batch 2, sequence 8] (built on the meta device by ``--dry-run``)."""
    return (torch.randint(2, 90, (2, 8), generator=None),)
