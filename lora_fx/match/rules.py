"""The forms a linear op takes, as data: one rule per form.

Each rule names the ops of one form, where its activation ``x`` and weight sit, the weight's
natural layout and the site kind (which branch serves it). Algebra, for a branch Δ added to
the op's output:

- ``nn.Linear``, ``F.linear`` / ``aten.linear``:  y = x Wᵀ + b, W [out, in]
  → y + s·x Aᵀ Bᵀ = x (W + s·B A)ᵀ + b.
- ``x @ W`` / ``torch.matmul`` / ``aten.matmul`` / ``aten.mm``:  y = x W, W [in, out]
  → y + s·x Aᵀ Bᵀ = x (W + s·(B A)ᵀ).
- ``addmm(b, x, W)`` (HF Conv1D, fan_in_fan_out):  y = b + x W, W [in, out] → as matmul.
- A transposed weight (``W.t()``, ``W.T``, ``aten.t``, ``aten.transpose(W, 0, 1)``,
  ``aten.permute(W, [1, 0])``, ``aten.numpy_T``) flips the layout: ``x @ W.t()`` is [out, in]
  (``graph.attrs.transposed``).
- conv (``nn.ConvNd``, ``F.convNd``, ``aten.convNd``, ``aten.convolution``): y = conv(x, W),
  W [out, in, *k], linear in W → y + s·B(A(x)) = conv(x, W + s·B·A), A a conv with W's
  geometry into r channels, B 1×1 (``branches.LoraConv``). groups ≠ 1 and transposed: Skip.
- embedding (``nn.Embedding``, ``F.embedding``, ``aten.embedding``): y = W[ids], W [num, dim]
  = onehot(ids) W, an [in, out] weight → W + s·(B A)ᵀ (``branches.LoraEmbedding``).
- experts (``F.linear`` / ``matmul`` / ``bmm`` whose weight is W[e] or W[ids] of a 3-D
  parameter W [E, d1, d2]): per expert as linear, y + s·x (U_e V_e) = x (W_e + s·U_e V_e) for
  the routed rows only (``match.experts``, ``branches.LoraExperts``). ``bmm`` of two
  activations is not a site. ``grouped_mm(x, W, offs)`` (transformers' grouped experts:
  ``aten._grouped_mm``, the custom op ``transformers::grouped_mm_fallback``, named by its
  qualified name): rows of block e, [offs[e-1], offs[e]), times W[e].
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten


Layout = Literal["out_in", "in_out"]


KINDS = ("linear", "conv", "embedding", "experts")


@dataclass(frozen=True)
class Rule:
    """One form: ops, argument positions of x and W, W's layout when untransposed, kind."""

    form: str
    targets: tuple[Any, ...]
    x_arg: int
    w_arg: int
    layout: Layout
    kind: str = "linear"


RULES: tuple[Rule, ...] = (
    Rule("F.linear", (F.linear, torch._C._nn.linear, aten.linear.default), 0, 1, "out_in"),
    Rule("matmul", (operator.matmul, torch.matmul, torch.mm, aten.matmul.default,
                    aten.mm.default, "matmul", "mm"), 0, 1, "in_out"),
    Rule("addmm", (torch.addmm, aten.addmm.default, "addmm"), 1, 2, "in_out"),
    Rule("conv", (torch.conv1d, torch.conv2d, torch.conv3d, aten.conv1d.default,
                  aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding,
                  aten.conv2d.padding, aten.conv3d.padding, aten.convolution.default),
         0, 1, "out_in", "conv"),
    Rule("embedding", (F.embedding,), 0, 1, "in_out", "embedding"),
    Rule("embedding", (aten.embedding.default,), 1, 0, "in_out", "embedding"),
    Rule("bmm", (torch.bmm, aten.bmm.default, "bmm"), 0, 1, "in_out", "experts"),  # W either side
    Rule("grouped_mm", (torch._grouped_mm, aten._grouped_mm.default,
                        *([F.grouped_mm] if hasattr(F, "grouped_mm") else []),
                        "transformers.grouped_mm_fallback",
                        "transformers.grouped_mm_fallback.default", "lorafx.grouped_mm.default"),
         0, 1, "in_out", "experts"),  # x [S, k] by row blocks of W [E, k, m] (offsets)
)


MODULE_RULES: tuple[tuple[type[nn.Module], str, Layout, str], ...] = (
    (nn.Linear, "nn.Linear", "out_in", "linear"),
    (nn.Conv1d, "nn.Conv1d", "out_in", "conv"),
    (nn.Conv2d, "nn.Conv2d", "out_in", "conv"),
    (nn.Conv3d, "nn.Conv3d", "out_in", "conv"),
    (nn.Embedding, "nn.Embedding", "in_out", "embedding"),
)


FORMS = ("nn.Linear", "F.linear", "matmul", "addmm", "nn.Conv1d", "nn.Conv2d", "nn.Conv3d",
         "conv1d", "conv2d", "conv3d", "nn.Embedding", "embedding", "bmm", "grouped_mm")


def rule_for(node: fx.Node) -> Rule | None:
    if node.op not in ("call_function", "call_method"):
        return None
    for rule in RULES:
        if node.target in rule.targets and (node.op == "call_function") != isinstance(
                node.target, str):
            return rule
        if node.op == "call_function" and str(node.target) in rule.targets:  # a custom op
            return rule
    return None

