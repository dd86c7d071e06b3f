"""Trace a module (or reuse a kept program) into an ONNXProgram with the dynamo exporter.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import LoraFxError
from ..progress import stage
from .experts import translation_table as expert_translations
from .rules import op_type_first

_NOISY = ("onnxscript.optimizer._constant_folding",  # "Evaluation failed": left to run time
          "torch.onnx._internal.exporter._registration",  # "torchvision is not installed"
          "onnx_ir._convenience")  # index_put's empty-list attribute: "type is ambiguous"


@contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the exporter's warnings, its registry's "torchvision is not installed" lines and
    onnxscript's constant-folding log lines ("Evaluation failed: ...": a constant it could not
    fold is left as computed at run time, which is not an error) while exporting."""
    loggers = [logging.getLogger(name) for name in _NOISY]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def to_onnx(model: nn.Module | torch.export.ExportedProgram, example_inputs: tuple[Any, ...],
            dynamic_shapes: Any = None, opset: int | None = None,
            translations: dict[Any, Any] | None = None) -> Any:
    """torch.onnx.export(dynamo=True) → ONNXProgram, with actionable errors.

    ``model``: a module (exported in eval mode, its mode restored after) or an ExportedProgram
    (exported as it is; ``example_inputs`` then ``()``). ``translations``: the exporter's
    ``custom_translation_table`` (op → onnxscript function), on top of the grouped expert
    matmuls' (``onnx.experts``).
    """
    kwargs: dict[str, Any] = {"dynamo": True, "verbose": False, "optimize": True}
    if opset is not None:
        kwargs["opset_version"] = opset
    translations = {**expert_translations(), **(translations or {})}  # grouped MoE matmuls
    kwargs["custom_translation_table"] = translations
    if dynamic_shapes is not None:
        kwargs["dynamic_shapes"] = dynamic_shapes
    try:
        with stage("exporting to ONNX"), eval_mode(model), quiet_exporter(), op_type_first():
            return torch.onnx.export(model, tuple(example_inputs), **kwargs)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LoraFxError(f"ONNX export failed: {type(err).__name__}: {first}; try another "
                          "--opset or report the model") from err


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """``model`` in eval mode inside the block, its own mode restored after (also on error);
    anything that is not a module (an ExportedProgram) is left as it is."""
    if not isinstance(model, nn.Module):
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)

