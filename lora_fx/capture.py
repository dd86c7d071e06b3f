"""Capture a module as a torch.fx GraphModule.

``torch.fx.symbolic_trace`` first (keeps ``nn.Linear`` as ``call_module`` nodes, shares the
model's modules); when it cannot trace (data-dependent control flow: every Hugging Face model),
``torch.export.export(..., strict=False)`` in eval mode, rebuilt as a plain GraphModule so that
``.train()``/``.eval()`` work. Export bakes dropout in by mode; ``aten.dropout`` nodes are turned
back into ``nn.Dropout`` submodules so dropout follows ``train()``/``eval()`` again.
"""

from __future__ import annotations

import traceback
import warnings
from typing import Any

import torch
from torch import fx, nn

from .errors import LoraFxError

CAPTURE_KEY = "lorafx_capture"  # gm.meta[CAPTURE_KEY]: "symbolic_trace" or "export"


def _auto_dynamic(example_inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """Dim.AUTO on every axis of every tensor input: export keeps what it can dynamic."""
    auto = torch.export.Dim.AUTO
    return tuple({i: auto for i in range(t.dim())} if isinstance(t, torch.Tensor) else None
                 for t in example_inputs)


def _where(err: BaseException) -> str:
    """The innermost frame outside torch of ``err``'s traceback, as ``file:line``."""
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if "/torch/" not in f.filename and "/lora_fx/" not in f.filename]
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def capture(model: nn.Module, example_inputs: tuple[Any, ...], dynamic_shapes: Any = None,
            method: str = "auto") -> fx.GraphModule:
    """Return a GraphModule computing ``model(*example_inputs)``.

    ``method``: "auto" (symbolic_trace, else export), "symbolic_trace" or "export".
    """
    if method not in ("auto", "symbolic_trace", "export"):
        raise LoraFxError(f"unknown capture method {method!r}: use auto, symbolic_trace or export")
    if isinstance(model, fx.GraphModule) and CAPTURE_KEY in model.meta:
        return model
    trace_error: BaseException | None = None
    if method in ("auto", "symbolic_trace"):
        try:
            gm = fx.symbolic_trace(model)
            gm.meta[CAPTURE_KEY] = "symbolic_trace"
            return gm
        except Exception as err:  # noqa: BLE001 - any tracing failure falls back to export
            trace_error = err
            if method == "symbolic_trace":
                raise LoraFxError(f"symbolic_trace failed{_where(err)}: {err}; use capture "
                                  "method 'export'") from err
    return _export(model, example_inputs, dynamic_shapes, trace_error)


def _export(model: nn.Module, example_inputs: tuple[Any, ...], dynamic_shapes: Any,
            trace_error: BaseException | None) -> fx.GraphModule:
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(
                model, tuple(example_inputs), strict=False,
                dynamic_shapes=dynamic_shapes if dynamic_shapes is not None
                else _auto_dynamic(tuple(example_inputs)))
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ("if the model returns a cache object, set config.use_cache=False; "
                "if a shape is specialized, pass dynamic_shapes or other example inputs")
        traced = f" (symbolic_trace failed too: {trace_error})" if trace_error else ""
        raise LoraFxError(f"cannot capture {type(model).__name__} with torch.export"
                          f"{_where(err)}: {type(err).__name__}: {first}{traced}; {hint}") from err
    finally:
        model.train(was_training)
    exported = ep.module()
    gm = fx.GraphModule(exported, exported.graph)
    gm.meta[CAPTURE_KEY] = "export"
    _dropout_to_modules(gm)
    gm.train(was_training)
    return gm


def _dropout_to_modules(gm: fx.GraphModule) -> int:
    """aten.dropout(x, p, train) -> call_module nn.Dropout(p): dropout follows train()/eval()."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.dropout.default:
            p = float(node.args[1])
            if p == 0.0:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                continue
            name = f"lorafx_dropout_{count}"
            gm.add_submodule(name, nn.Dropout(p))
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, (node.args[0],))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            count += 1
    gm.graph.lint()
    gm.recompile()
    return count
