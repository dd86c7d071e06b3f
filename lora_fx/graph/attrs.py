"""Attribute access on a GraphModule: get_attr walking, transposes, copy-on-write setting.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn

aten = torch.ops.aten


def innermost_module(node: fx.Node) -> tuple[str, Any] | None:
    """(path, class) of the innermost module whose forward made ``node``, from torch.export's
    ``nn_module_stack``; None where the node has none."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    return str(path), cls


def resolve_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def transposed(node: Any) -> Any | None:
    """The tensor under a 2-D transpose node, or None if ``node`` is not one."""
    if not isinstance(node, fx.Node):
        return None
    t, args = node.target, node.args
    if node.op == "call_method" and t == "t":
        return args[0]
    if node.op == "call_function":
        if t in (torch.t, aten.t.default, aten.numpy_T.default):
            return args[0]
        if t is getattr and args[1] in ("T", "mT"):
            return args[0]
        if t in (aten.transpose.int, torch.transpose) and set(args[1:3]) in ({0, 1}, {-1, -2}):
            return args[0]
        if t is aten.permute.default and isinstance(args[1], (list, tuple)) and \
                list(args[1]) == [1, 0]:
            return args[0]
    if node.op == "call_method" and t == "transpose" and set(args[1:3]) in ({0, 1}, {-1, -2}):
        return args[0]
    return None


def cow_child(parent: nn.Module, name: str) -> nn.Module:
    """Replace ``parent.name`` by a shallow copy with its own child/param/buffer dicts, and
    hook dicts (a hook registered on the copy must not reach the original)."""
    child = parent.get_submodule(name)
    twin = copy.copy(child)
    twin._modules = dict(child._modules)
    twin._parameters = dict(child._parameters)
    twin._buffers = dict(child._buffers)
    for key, value in vars(child).items():
        if "hook" in key and isinstance(value, dict):
            twin.__dict__[key] = type(value)(value)
    parent._modules[name] = twin
    return twin


def cow_module(root: nn.Module, path: str) -> nn.Module:
    """``root.<path>`` after it and every module above it became copies of their own
    (``cow_child``): safe to change (register hooks on) without touching shared modules."""
    mod = root
    for name in path.split("."):
        mod = cow_child(mod, name)
    return mod


def set_attr_cow(root: nn.Module, path: str, value: Any) -> None:
    """``root.<path> = value`` without touching modules that ``root`` shares with others.

    Every module along ``path`` is replaced by a shallow copy first, so a module of the user's
    model that the GraphModule shares is never mutated.
    """
    *parents, last = path.split(".")
    mod = root
    for name in parents:
        mod = cow_child(mod, name)
    if isinstance(value, nn.Module):
        mod._modules[last] = value
    elif last in mod._parameters or isinstance(value, nn.Parameter):
        mod._parameters[last] = value
    elif last in mod._buffers:
        mod._buffers[last] = value
    else:
        setattr(mod, last, value)


def add_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register ``module`` at ``path``, creating empty parents as needed."""
    *parents, last = path.split(".")
    mod = root
    for name in parents:
        if name not in mod._modules:
            mod.add_module(name, nn.Module())
        mod = mod.get_submodule(name)
    mod.add_module(last, module)
