"""ONNX output names from the model's own output: ``logits``, ``last_hidden_state``, ...

The exporter names each output after the graph node that made it (``linear_14``, ``tanh``).
Deployment code fetches outputs by name, and optimum and ORT GenAI use the model's field
names: a ``ModelOutput`` (or dict, or namedtuple) gives each tensor its key path
(``logits``, ``pooler_output``, ``hidden_states.0``). A bare tensor or a plain tuple has no
names, and the file keeps the exporter's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree


def _key(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _spec(module: Any) -> Any:
    """The output TreeSpec of an ExportedProgram or a GraphModule (None when unknown)."""
    if isinstance(module, torch.export.ExportedProgram):
        return module.call_spec.out_spec
    if not isinstance(module, fx.GraphModule):
        return None
    info = getattr(module.graph._codegen, "pytree_info", None)
    if info is not None and info.out_spec is not None:
        return info.out_spec
    _, spec = pytree.tree_flatten(module.graph.output_node().args[0])
    return spec


def output_names(module: Any) -> list[str] | None:
    """The key path of each output leaf, joined by "." (None when the output is not keyed:
    a tensor, a tuple, or leaves that are not tensors)."""
    spec = _spec(module)
    if spec is None or spec.num_leaves == 0:
        return None
    leaves = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    paths = [path for path, _ in pytree.tree_flatten_with_path(leaves)[0]]
    names = [".".join(_key(k) for k in path) for path in paths]
    if not all(any(not hasattr(k, "idx") for k in path) for path in paths):
        return None  # a plain tuple: no names of the model's own
    return names if len(set(names)) == len(names) else None


def name_outputs(model: Any, names: list[str] | None) -> bool:
    """Rename the graph outputs of an ``onnx_ir.Model`` to ``names`` (in order); values that
    hold one of those names already are renamed aside. False (nothing renamed) when the
    counts differ or an output is a graph input, an initializer or listed twice."""
    graph = model.graph
    outputs = list(graph.outputs)
    if not names or len(names) != len(outputs) or len({id(v) for v in outputs}) != len(outputs):
        return False
    if any(v.producer() is None for v in outputs):  # a graph input or initializer passed out
        return False
    wanted = set(names)
    taken = {v.name for v in graph.inputs} | set(graph.initializers)
    taken |= {o.name for node in graph for o in node.outputs}
    for node in graph:
        for value in node.outputs:
            if value.name in wanted and value not in outputs:
                value.name = _free(value.name, taken)
    for value, name in zip(outputs, names, strict=True):
        value.name = name
    return True


def _free(name: str, taken: set[str]) -> str:
    k = 1
    while f"{name}_{k}" in taken:
        k += 1
    taken.add(f"{name}_{k}")
    return f"{name}_{k}"
