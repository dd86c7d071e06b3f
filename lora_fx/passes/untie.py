"""Untie: give the uses of one site their own copy of a tensor other ops also read.

A tied weight W (GPT-2's lm_head and wte) is read by several ops. A LoRA on one use must change
only that use, so the merge never folds into W while any other op reads it: the site's uses
read a new parameter W' = W + ΔW, registered at a path of their own, and every other reader
keeps W. The merged graph then holds one more tensor than the base (and its ONNX export one
more initializer): the price of changing one use of a shared weight.
"""

from __future__ import annotations

import copy

from torch import fx, nn

from ..graph.attrs import cow_child, resolve_attr, set_attr_cow, transposed


def _usable(gm: fx.GraphModule, path: str) -> bool:
    """Nothing lives at ``path`` and each of its parents is a module or absent."""
    obj: object = gm
    for part in path.split("."):
        if not isinstance(obj, nn.Module):
            return False
        obj = getattr(obj, part, None)
        if obj is None:
            return True
    return False


def free_path(gm: fx.GraphModule, stem: str, leaf: str = "weight") -> str:
    """``stem.leaf`` if usable in ``gm``, else ``stem_untied.leaf``, ``stem_untied2.leaf``…"""
    stem = stem.replace("@", "_")
    candidate, n = f"{stem}.{leaf}", 1
    while not _usable(gm, candidate):
        candidate = f"{stem}_untied{n if n > 1 else ''}.{leaf}"
        n += 1
    return candidate


def _set_param(gm: fx.GraphModule, path: str, value: nn.Parameter) -> None:
    """Register ``value`` at ``path``: existing parents copied on write, missing ones created."""
    *parents, last = path.split(".")
    mod: nn.Module = gm
    for name in parents:
        if name in mod._modules:
            mod = cow_child(mod, name)
        else:
            child = nn.Module()
            mod.add_module(name, child)
            mod = child
    mod._parameters[last] = value


def _untie_module_use(gm: fx.GraphModule, use: fx.Node, value: nn.Parameter) -> None:
    """A call_module use: a shallow copy of the module, with ``value`` as weight, at a new path."""
    twin = copy.copy(gm.get_submodule(str(use.target)))
    twin._modules, twin._buffers = dict(twin._modules), dict(twin._buffers)
    twin._parameters = dict(twin._parameters)
    twin._parameters["weight"] = value
    path = free_path(gm, str(use.target)).rpartition(".")[0]
    set_attr_cow(gm, path, twin)
    use.target = path


def _copy_reading(graph: fx.Graph, node: fx.Node, old: fx.Node, new: fx.Node) -> fx.Node:
    """A copy of ``node`` (a transpose) that reads ``new`` where it read ``old``."""
    return graph.node_copy(node, lambda n: new if n is old else n)


def _untie_attr_use(gm: fx.GraphModule, use: fx.Node, weight: object, path: str) -> None:
    """A use reading the weight through get_attr (maybe transposed): point it at ``path``."""
    graph = gm.graph
    for arg in list(use.all_input_nodes):
        under = transposed(arg)
        source = under if isinstance(under, fx.Node) else arg
        if source.op != "get_attr" or resolve_attr(gm, str(source.target)) is not weight:
            continue
        with graph.inserting_before(use):
            read = graph.get_attr(path)
            new = read if source is arg else _copy_reading(graph, arg, source, read)
        new.meta = {k: v for k, v in arg.meta.items() if k != "lora"}
        use.replace_input_with(arg, new)


def untie(gm: fx.GraphModule, uses: list[fx.Node], weight: nn.Parameter, value: nn.Parameter,
          site: str) -> None:
    """Make every op in ``uses`` read ``value`` instead of ``weight``; other readers keep it."""
    path = free_path(gm, site)
    registered = False
    for use in uses:
        if use.op == "call_module":
            _untie_module_use(gm, use, value)
            continue
        if not registered:
            _set_param(gm, path, value)
            registered = True
        _untie_attr_use(gm, use, weight, path)
