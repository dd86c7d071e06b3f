"""MODEL specs -> (module, example inputs, extras), and the plugin registry.

A MODEL is ``path/to/model.py`` or ``path/to/model.py:factory`` (a Python file that defines
``build_model()`` or the named factory, or a module-level ``model``; and ``example_inputs()``
or a module-level tuple), or ``NAME:ARG`` for a plugin registered in the entry-point group
``lorafx.plugins`` (built in: ``hf:DIR``). Loading a model file runs its code: only load files
you trust.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import torch
from torch import nn

from .errors import LoraFxError


@dataclass
class LoadedModel:
    """What a MODEL spec yields: the module, its example inputs and optional training hooks."""

    module: nn.Module
    example_inputs: tuple[Any, ...]
    dynamic_shapes: Any = None
    train_batches: Callable[[], Iterable[tuple[tuple[Any, ...], Any]]] | None = None
    eval_batches: Callable[[], Iterable[tuple[tuple[Any, ...], Any]]] | None = None
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
    name: str = "model"
    extras: dict[str, Any] = field(default_factory=dict)


class Plugin(Protocol):
    """An entry point of group ``lorafx.plugins``: ``load(arg)`` for the spec ``NAME:arg``."""

    def load(self, arg: str, meta: bool = False) -> LoadedModel: ...


def plugins() -> dict[str, Any]:
    """Registered plugins by name (entry-point group ``lorafx.plugins``)."""
    found: dict[str, Any] = {}
    for ep in entry_points(group="lorafx.plugins"):
        found[ep.name] = ep
    return found


def load_model(spec: str, meta: bool = False) -> LoadedModel:
    """Resolve a MODEL spec. ``meta=True`` builds the module on the meta device (no weights)."""
    head, sep, rest = spec.partition(":")
    if sep and not head.endswith(".py") and len(head) > 1:  # plugin spec, not C:\ or file.py
        eps = plugins()
        if head not in eps:
            raise LoraFxError(f"unknown MODEL plugin {head!r} in {spec!r}: installed plugins are "
                              f"{', '.join(sorted(eps)) or 'none'}; or pass a model.py file")
        plugin = eps[head].load()
        return plugin.load(rest, meta=meta)  # type: ignore[no-any-return]
    return load_model_file(spec, meta=meta)


def _import_file(path: Path) -> ModuleType:
    name = f"lorafx_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LoraFxError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        raise LoraFxError(f"{path}:{err.lineno}: syntax error: {err.msg}") from err
    except LoraFxError:
        raise
    except Exception as err:
        raise LoraFxError(f"{path}: running the model file raised {type(err).__name__}: {err}"
                          ) from err
    finally:
        sys.path.remove(str(path.parent.resolve()))
    return module


def _call(path: Path, what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except LoraFxError:
        raise
    except Exception as err:
        raise LoraFxError(f"{path}: {what} raised {type(err).__name__}: {err}") from err


def load_model_file(spec: str, meta: bool = False) -> LoadedModel:
    """Load ``model.py[:factory]``; see the module docstring for what the file provides."""
    file, _, factory = spec.partition(":") if spec.count(":") == 1 and not Path(spec).exists() \
        else (spec, "", "")
    path = Path(file)
    if not path.is_file():
        raise LoraFxError(f"model file {path} does not exist: pass path/to/model.py"
                          "[:factory] or a plugin spec such as hf:DIR")
    mod = _import_file(path)
    builder = getattr(mod, factory or "build_model", None)
    if factory and builder is None:
        raise LoraFxError(f"{path} defines no {factory!r}: name an existing factory")
    with torch.device("meta") if meta else contextlib.nullcontext():
        if builder is not None:
            module = _call(path, f"{factory or 'build_model'}()", builder)
        elif isinstance(getattr(mod, "model", None), nn.Module):
            module = mod.model
        else:
            raise LoraFxError(f"{path} has no model: define build_model() returning an "
                              "nn.Module, or a module-level `model`")
        if not isinstance(module, nn.Module):
            raise LoraFxError(f"{path}: {factory or 'build_model'}() returned "
                              f"{type(module).__name__}, not an nn.Module")
        ex = getattr(mod, "example_inputs", None)
        if ex is None:
            raise LoraFxError(f"{path} has no example_inputs: define example_inputs() returning "
                              "a tuple of tensors")
        inputs = _call(path, "example_inputs()", ex) if callable(ex) else ex
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)):
        raise LoraFxError(f"{path}: example_inputs must be a tuple of tensors, got "
                          f"{type(inputs).__name__}")
    return LoadedModel(
        module=module, example_inputs=tuple(inputs),
        dynamic_shapes=getattr(mod, "dynamic_shapes", None),
        train_batches=getattr(mod, "train_batches", None),
        eval_batches=getattr(mod, "eval_batches", None),
        loss_fn=getattr(mod, "loss_fn", None), name=path.stem)
