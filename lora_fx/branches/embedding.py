"""LoRA on an embedding lookup, in PEFT's layout and math."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Factor, LoraBranch, weight_of


class LoraEmbedding(LoraBranch):
    """Δ(ids) = s · F.embedding(ids, Aᵀ) @ Bᵀ for y = W[ids], W [num, dim].

    A [r, num] and B [dim, r] are PEFT's ``lora_embedding_A`` / ``lora_embedding_B`` (saved
    without a ``.weight`` suffix). A lookup is a one-hot product, W[ids] = onehot(ids) @ W, so
    Δ = onehot(ids) @ (s · B @ A)ᵀ and the merge is W' = W + s · (B @ A)ᵀ (W is [in, out] in
    the one-hot view). ``padding_idx`` is passed on as PEFT does (it only stops gradients).
    No dropout on ids, as in PEFT. Init as PEFT: A = 0, B ~ N(0, 1); ``init=False``: both
    N(0, 1).
    """

    kind = "embedding"  # adapters.KEYS: saved as lora_embedding_A / lora_embedding_B

    def __init__(self, num_embeddings: int, dim: int, r: int, scale: float,
                 geometry: dict[str, Any] | None = None, init: bool | str = True,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        geometry = geometry or {}
        self.lora_A = Factor(r, num_embeddings, dtype=dtype, device=device)
        self.lora_B = Factor(dim, r, dtype=dtype, device=device)
        self.padding_idx: int | None = geometry.get("padding_idx")
        self.scale_grad_by_freq = bool(geometry.get("scale_grad_by_freq", False))
        self.scaling = float(scale)
        a, b = weight_of(self.lora_A), weight_of(self.lora_B)
        if not a.is_meta:
            with torch.no_grad():
                nn.init.normal_(b)
                if init is False:
                    nn.init.normal_(a)
                else:
                    nn.init.zeros_(a)

    def delta_weight(self, layout: str = "in_out") -> torch.Tensor:
        """ΔW = s · (B @ A)ᵀ [num, dim] in fp32 (its transpose for layout "out_in")."""
        delta = self.scaling * (weight_of(self.lora_B).float() @ weight_of(self.lora_A).float())
        return delta if layout == "out_in" else delta.t()

    def forward(self, ids: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """Δ(ids), returned in the dtype of ``like`` (the lookup's output; default A's),
        computed in it ("input") or in the factors' dtype ("adapter")."""
        a, b = weight_of(self.lora_A), weight_of(self.lora_B)
        out = like.dtype if like is not None else a.dtype
        dtype = a.dtype if self.compute == "adapter" else out
        hidden = F.embedding(ids, self.cast(a, dtype).t(), padding_idx=self.padding_idx,
                             scale_grad_by_freq=self.scale_grad_by_freq)
        return ((hidden @ self.cast(b, dtype).t()) * self.scaling).to(out)
