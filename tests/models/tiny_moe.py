"""Tiny default-style mixture-of-experts decoders from configs (a MODEL file: Mixtral).

Built as users build them: the config's default experts implementation (``grouped_mm`` in
transformers 5, the data-dependent ``eager`` loop where set), 3-D expert parameters
(``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]). Hidden 32, 2 layers, E experts, top 2.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB, HIDDEN, LAYERS, TOP_K = 64, 32, 2, 2


def _common() -> dict[str, int]:
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=TOP_K,
                max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def mixtral(experts: int = 4, seed: int = 0) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(intermediate_size=48, num_local_experts=experts, **_common())
    return MixtralForCausalLM(cfg).eval()


def qwen3_moe(experts: int = 4, seed: int = 0) -> nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=24, head_dim=8,
                         num_experts=experts, decoder_sparse_step=1, **_common())
    return Qwen3MoeForCausalLM(cfg).eval()


def olmoe(experts: int = 4, seed: int = 0) -> nn.Module:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(seed)
    cfg = OlmoeConfig(intermediate_size=24, num_experts=experts, **_common())
    return OlmoeForCausalLM(cfg).eval()


FAMILIES = {"mixtral": mixtral, "qwen3_moe": qwen3_moe, "olmoe": olmoe}


def build_model() -> nn.Module:
    return mixtral()


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0)),)
