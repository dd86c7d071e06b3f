"""The low-rank branch modules that the inject pass calls from the graph.

One class per form, each owning its algebra. The interface (:class:`LoraBranch`), which a new
variant (DoRA, ...) implements as a new class:

- ``lora_A.weight``, ``lora_B.weight``: the trainable factors, in PEFT's tensor layout
  (linear: A [r, in], B [out, r]; conv: A [r, in, *k], B [out, r, 1…]; embedding: A [r, num],
  B [dim, r]). ``scaling``: s. ``r``: the rank.
- ``forward(x) -> Δ(x)``: what the inject pass adds to the op's output, y + Δ(x).
- ``delta_weight(layout) -> ΔW``: fp32, shaped like the base weight (``layout`` "out_in" or
  "in_out" for linear forms: an [in, out] weight gets ΔWᵀ).
- ``fold(weight, layout, where) -> W'``: W + ΔW in fp32, cast once, refused when not finite;
  the merge pass calls only this, so it never branches on the branch type.
- ``peft_factors() -> (A, B)`` / ``load_factors(A, B, where)``: the tensors PEFT saves, and
  back (a fused branch writes its exactly equivalent plain LoRA).
- ``kind``: "linear", "conv", "embedding" or "experts": the site kind it serves;
  ``adapters.KEYS`` maps it to PEFT's key suffixes (``lora_A.weight``, or
  ``lora_embedding_A`` for embeddings). ``peft_name``: the module path PEFT keys the factors
  by, where it is not the site's name (an expert stack: ``mlp.experts[.base_layer]``).
"""

from __future__ import annotations

from .base import Factor, LoraBranch, copy_checked, weight_of
from .conv import LoraConv
from .embedding import LoraEmbedding
from .experts import LoraExperts
from .linear import LoraFused, LoraLinear

__all__ = ["Factor", "LoraBranch", "LoraConv", "LoraEmbedding", "LoraExperts", "LoraFused",
           "LoraLinear", "copy_checked", "weight_of"]
