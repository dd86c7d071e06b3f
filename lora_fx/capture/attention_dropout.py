"""Give attention-probability dropout back to a torch.export capture.

Capture runs the model in eval mode, where an attention module calls

    scaled_dot_product_attention(q, k, v, mask, dropout_p = p if self.training else 0)

so the captured SDPA node holds dropout_p = 0 and training the graph would silently drop the
model's attention dropout (PEFT, running the model's own code, applies it). This pass finds the
module that made each SDPA call (the innermost entry of ``nn_module_stack``), reads its ``p``
where the model keeps it (Hugging Face's conventions, ``nn.MultiheadAttention``'s ``dropout``),
and feeds ``dropout_p`` from an ``AttentionDropoutP`` submodule: ``p`` in ``train()``, ``0`` in
``eval()``. In eval mode, and so in every export, the graph computes exactly what it did.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ..graph.attrs import innermost_module
from ..passes.runner import PassResult

SDPA = torch.ops.aten.scaled_dot_product_attention.default
# where attention modules keep the probability they pass to SDPA (float or nn.Dropout)
ATTRIBUTES = ("attention_dropout", "attn_dropout", "attn_drop", "dropout_prob", "dropout_p",
              "dropout")
PREFIX = "lorafx_dropout_attn_"  # a lorafx_dropout_* module: identity-like for export reuse


class AttentionDropoutP(nn.Module):
    """The ``dropout_p`` an attention module passes to SDPA: ``p`` in train mode, else 0."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self) -> float:
        return self.p if self.training else 0.0

    def extra_repr(self) -> str:
        return f"p={self.p}"


def probability(module: nn.Module) -> float | None:
    """The attention dropout probability ``module`` keeps, if it keeps one by convention."""
    for name in ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, nn.Dropout):
            return float(value.p)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _caller(node: fx.Node, model: nn.Module) -> nn.Module | None:
    found = innermost_module(node)
    if found is None:
        return None
    path = found[0]
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def attention_dropout_pass(gm: fx.GraphModule, model: nn.Module) -> PassResult:
    """Feed every eval-captured SDPA's ``dropout_p`` from its module's probability (> 0)."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not SDPA:
            continue
        captured = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
        caller = _caller(node, model)
        p = probability(caller) if caller is not None else None
        if captured != 0.0 or p is None or not 0.0 < p < 1.0:
            continue
        name = f"{PREFIX}{count}"
        gm.add_submodule(name, AttentionDropoutP(p))
        with gm.graph.inserting_before(node):
            dropout_p = gm.graph.call_module(name, ())
        if len(node.args) > 4:
            node.update_arg(4, dropout_p)
        else:
            node.update_kwarg("dropout_p", dropout_p)
        count += 1
    return PassResult(gm, count > 0, {"attention_dropout": count})
