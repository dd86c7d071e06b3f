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
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import LoraFxError
from .meta import meta_device


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
        try:
            plugin = eps[head].load()
        except Exception as err:
            raise LoraFxError(f"MODEL plugin {head!r} cannot be loaded ({type(err).__name__}: "
                              f"{_first_line(err)}): reinstall the package that provides it"
                              ) from err
        try:
            loaded = plugin.load(rest, meta=meta)
        except (LoraFxError, KeyboardInterrupt):
            raise
        except Exception as err:
            raise LoraFxError(f"MODEL plugin {head!r} failed on {rest!r} with "
                              f"{type(err).__name__}{user_frame(err)}: {_first_line(err)}: "
                              "check the argument, or rerun with --debug") from err
        if not isinstance(loaded, LoadedModel):
            raise LoraFxError(f"MODEL plugin {head!r} returned {type(loaded).__name__}, not a "
                              "LoadedModel: fix the plugin")
        loaded.example_inputs = check_inputs(loaded.example_inputs, spec)
        return loaded
    return load_model_file(spec, meta=meta)


def _import_file(path: Path) -> ModuleType:
    """Run the model file as a fresh module (its directory importable while it runs)."""
    name = f"lorafx_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LoraFxError(f"cannot import {path}: not a Python file; pass path/to/model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    folder = str(path.parent.resolve())
    sys.path.insert(0, folder)
    cache, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ left there
    try:
        spec.loader.exec_module(module)
    except BaseException as err:
        sys.modules.pop(name, None)
        mapped = _file_error(path, err)
        if mapped is err:
            raise
        raise mapped from err
    finally:
        sys.path.remove(folder)
        sys.dont_write_bytecode = cache
    return module


def _file_error(path: Path, err: BaseException) -> BaseException:
    """The one-line LoraFxError for an exception raised while importing ``path``."""
    if isinstance(err, (LoraFxError, KeyboardInterrupt)):
        return err
    if isinstance(err, SyntaxError) and err.filename in (None, str(path), str(path.resolve())):
        if "null bytes" in str(err.msg) or "unicode error" in str(err.msg):
            return LoraFxError(f"{path} is not a Python source file ({err.msg}): pass the "
                               "model.py that defines build_model()")
        line = f":{err.lineno}" if err.lineno else ""
        return LoraFxError(f"{path}{line}: syntax error: {err.msg}: fix the file")
    if isinstance(err, OSError) and err.filename in (str(path), str(path.resolve())):
        return LoraFxError(f"cannot read model file {path}: {err.strerror}: check that it exists "
                           "and is readable")
    if isinstance(err, SystemExit):
        return LoraFxError(f"{path} called sys.exit({err.code!r}) while being imported: guard "
                           "script code with `if __name__ == \"__main__\":`")
    return LoraFxError(f"{path}: running the model file raised {type(err).__name__}"
                       f"{user_frame(err)}: {_first_line(err)}: fix the file")


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else "(no message)"


def user_frame(err: BaseException) -> str:
    """`` at file:line (`code`)`` of the innermost frame of ``err`` outside torch and lorafx."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not _is_library(f.filename)]
    if not frames:
        return ""
    f = frames[-1]
    code = f" (`{f.line.strip()}`)" if f.line and f.line.strip() else ""
    return f" at {f.filename}:{f.lineno}{code}"


_LIBRARY_DIRS = tuple(str(Path(m.__file__).resolve().parent) + os.sep
                      for m in (torch, sys.modules[__package__ or "lora_fx"]) if m.__file__)


def _is_library(filename: str) -> bool:
    return filename.startswith("<") or str(Path(filename).resolve()).startswith(_LIBRARY_DIRS)


def _call(path: Path, what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except (LoraFxError, KeyboardInterrupt):
        raise
    except BaseException as err:
        raise LoraFxError(f"{path}: {what} raised {type(err).__name__}{user_frame(err)}: "
                          f"{_first_line(err)}: fix the model file") from err


def load_model_file(spec: str, meta: bool = False, check: bool = True) -> LoadedModel:
    """Load ``model.py[:factory]``; see the module docstring for what the file provides.

    ``check`` runs the model once on its example inputs (not on the meta device), so that
    inputs that do not fit are reported here, with the failing line, rather than mid-capture.
    """
    file, _, factory = spec.partition(":") if spec.count(":") == 1 and not Path(spec).exists() \
        else (spec, "", "")
    path = _model_path(Path(file))
    mod = _import_file(path)
    builder = getattr(mod, factory or "build_model", None)
    what = f"{factory or 'build_model'}()"
    if factory and builder is None:
        raise LoraFxError(f"{path} defines no {factory!r}: name an existing factory")
    if builder is not None and not callable(builder):
        raise LoraFxError(f"{path}: {factory or 'build_model'} is a "
                          f"{type(builder).__name__}, not a function: make it a factory")

    with meta_device() if meta else contextlib.nullcontext():
        if builder is not None:
            module = _call(path, what, builder)
        elif isinstance(getattr(mod, "model", None), nn.Module):
            module = mod.model
        else:
            raise LoraFxError(f"{path} has no model: define build_model() returning an "
                              "nn.Module, or a module-level `model`")
        if not isinstance(module, nn.Module):
            raise LoraFxError(f"{path}: {what} returned {type(module).__name__}, not an "
                              "nn.Module: return the model")
        ex = getattr(mod, "example_inputs", None)
        if ex is None:
            raise LoraFxError(f"{path} has no example_inputs: define example_inputs() returning "
                              "a tuple of tensors")
        inputs = _call(path, "example_inputs()", ex) if callable(ex) else ex
    inputs = check_inputs(inputs, str(path))
    hooks = {key: getattr(mod, key, None) for key in ("train_batches", "eval_batches", "loss_fn")}
    for key, fn in hooks.items():
        if fn is not None and not callable(fn):
            raise LoraFxError(f"{path}: {key} must be a function, got {type(fn).__name__}")
    if check and not meta:
        check_forward(module, inputs, str(path))
    return LoadedModel(module=module, example_inputs=inputs,
                       dynamic_shapes=getattr(mod, "dynamic_shapes", None), name=path.stem,
                       train_batches=hooks["train_batches"], eval_batches=hooks["eval_batches"],
                       loss_fn=hooks["loss_fn"])


def _model_path(path: Path) -> Path:
    """``path`` if it is a readable file; otherwise a LoraFxError saying what is wrong."""
    if path.is_dir():
        raise LoraFxError(f"model file {path} is a directory: pass the model.py inside it, or "
                          "hf:DIR for a Hugging Face model directory")
    if not path.exists():
        hint = " (a broken symbolic link)" if path.is_symlink() else ""
        raise LoraFxError(f"model file {path} does not exist{hint}: pass path/to/model.py"
                          "[:factory] or a plugin spec such as hf:DIR")
    if not path.is_file():
        raise LoraFxError(f"model file {path} is not a regular file: pass path/to/model.py")
    return path


_SCALARS = (bool, int, float, type(None))


def check_inputs(inputs: Any, where: str) -> tuple[Any, ...]:
    """``inputs`` as a tuple whose leaves are tensors (or None / bool / int / float)."""

    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)):
        raise LoraFxError(f"{where}: example_inputs must be a tuple of tensors, got "
                          f"{type(inputs).__name__}: return e.g. (torch.randn(2, 16),)")
    for i, item in enumerate(inputs):
        for leaf in pytree.tree_leaves(item):
            if isinstance(leaf, torch.Tensor) or isinstance(leaf, _SCALARS):
                continue
            kind = type(leaf).__name__
            advice = "wrap it with torch.from_numpy(...)" if type(leaf).__module__ == "numpy" \
                else "pass tensors"
            raise LoraFxError(f"{where}: example input {i} is a {kind}, not a tensor: {advice}")
    if not any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(tuple(inputs))):
        raise LoraFxError(f"{where}: example_inputs holds no tensor: return a tuple of tensors")
    return tuple(inputs)


def check_forward(module: nn.Module, inputs: tuple[Any, ...], where: str) -> None:
    """Run ``module(*inputs)`` once in eval mode without gradients; explain a failure."""
    was_training = module.training
    stack: list[str] = []  # modules entered and not yet left: the last one is failing
    names = {id(m): name for name, m in module.named_modules()}

    def enter(mod: nn.Module, args: Any) -> None:
        stack.append(names.get(id(mod), "?"))

    def leave(mod: nn.Module, args: Any, out: Any) -> None:
        if stack:
            stack.pop()

    hooks = [nn.modules.module.register_module_forward_pre_hook(enter),
             nn.modules.module.register_module_forward_hook(leave)]
    module.eval()
    try:
        with torch.no_grad():
            module(*inputs)
    except (LoraFxError, KeyboardInterrupt):
        raise
    except Exception as err:
        shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
                           if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs)
        inner = [n for n in stack if n and n != "?"]
        mod = f" in module {inner[-1]!r}" if inner else ""
        raise LoraFxError(f"{where}: the model fails on its example inputs ({shapes}){mod}"
                          f"{user_frame(err)}: {type(err).__name__}: {_first_line(err)}: make "
                          "example_inputs() match forward()") from err
    finally:
        for hook in hooks:
            hook.remove()
        module.train(was_training)
