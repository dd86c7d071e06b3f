"""Copies of graphs and modules that share the original's tensors and submodules.
"""

from __future__ import annotations

import copy
import warnings

from torch import fx, nn

from .portable import graph_module


def copy_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    with warnings.catch_warnings():  # torch's own LeafSpec deprecation, raised by deepcopy
        warnings.simplefilter("ignore", FutureWarning)
        new._codegen = copy.deepcopy(graph._codegen)
    val_map: dict[fx.Node, fx.Node] = {}
    out = new.graph_copy(graph, val_map, return_output_node=True)
    assert isinstance(out, tuple)
    new.output(out[0], type_expr=getattr(graph.output_node(), "type", None))
    return new


def shallow_copy(module: nn.Module) -> nn.Module:
    """A new root over the same submodules, safe for ``set_attr_cow`` (``module`` untouched)."""
    if isinstance(module, fx.GraphModule):

        new = graph_module(module, copy_graph(module.graph))
        new.meta = dict(module.meta)
        new.train(module.training)
        return new
    twin = copy.copy(module)
    twin._modules = dict(module._modules)
    twin._parameters = dict(module._parameters)
    twin._buffers = dict(module._buffers)
    return twin
