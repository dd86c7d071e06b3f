"""Fix-up of a torch.export capture: dropout follows ``train()``/``eval()`` again.

``aten.dropout(x, p, train)`` is baked in by the mode at export time; each becomes
``call_module nn.Dropout(p)`` (p = 0: the identity, removed).
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ..passes.runner import PassResult


def dropout_pass(gm: fx.GraphModule) -> PassResult:
    """aten.dropout(x, p, train) -> call_module nn.Dropout(p): dropout follows train()/eval()."""
    count, removed = 0, 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.dropout.default:
            p = float(node.args[1])
            if p == 0.0:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                removed += 1
                continue
            name = f"lorafx_dropout_{count}"
            gm.add_submodule(name, nn.Dropout(p))
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, (node.args[0],))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            count += 1
    return PassResult(gm, count + removed > 0, {"dropout": count, "removed": removed})

