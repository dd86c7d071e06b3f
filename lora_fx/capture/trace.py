"""Capture a module as a torch.fx GraphModule.

``torch.fx.symbolic_trace`` first (keeps ``nn.Linear`` as ``call_module`` nodes, shares the
model's modules); when it cannot trace (data-dependent control flow: every Hugging Face model),
``torch.export.export(..., strict=False)`` in eval mode, rebuilt as a plain GraphModule so that
``.train()``/``.eval()`` work. Export bakes dropout in by mode; the fix-ups turn ``aten.dropout``
back into ``nn.Dropout`` submodules (``capture.dropout``) and feed back the attention dropout
that SDPA calls lost in eval mode (``capture.attention_dropout``). Mixture-of-experts blocks
are captured with an exportable implementation (``capture.experts``), their grouped matmuls as
``lorafx::grouped_mm`` (``capture.grouped``). The program is kept (``capture.program``) so
that ONNX export need not trace again.
"""

from __future__ import annotations

import contextlib
import io
import re
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn

from ..errors import LoraFxError
from ..graph.portable import PortableGraphModule
from ..passes.runner import run_pass
from ..progress import stage
from .attention_dropout import attention_dropout_pass
from .cache import no_cache
from .dropout import dropout_pass
from .dynamic import auto_dynamic, widened
from .experts import exportable_experts
from .grouped import grouped_pass
from .program import PROGRAM_KEY
from .recapture import remember

CAPTURE_KEY = "lorafx_capture"  # gm.meta[CAPTURE_KEY]: "symbolic_trace" or "export"


def _where(err: BaseException) -> str:
    """The innermost frame outside torch of ``err``'s traceback, as ``file:line``."""
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if "/torch/" not in f.filename and "/lora_fx/" not in f.filename]
    if not frames:
        return ""
    code = (frames[-1].line or "").strip()
    return f" at {frames[-1].filename}:{frames[-1].lineno}" + (f" (`{code}`)" if code else "")


# torch.nn modules that read their projection weights functionally (in_proj_weight,
# out_proj.weight): traced through, not kept as leaves, so those projections become sites
_OPEN_MODULES = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                 nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer)


class _Tracer(fx.Tracer):
    """symbolic_trace's tracer, tracing into ``_OPEN_MODULES`` instead of calling them."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return not isinstance(m, _OPEN_MODULES) and super().is_leaf_module(
            m, module_qualified_name)


def _symbolic_trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(model)
    return PortableGraphModule(tracer.root, graph, type(model).__name__)


@contextlib.contextmanager
def _no_mha_fastpath() -> Iterator[None]:
    """Keep attention off its fused eval kernels, which take the projections as one opaque op."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


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
            gm = _symbolic_trace(model)
            gm.meta[CAPTURE_KEY] = "symbolic_trace"
            return gm
        except Exception as err:  # noqa: BLE001 - any tracing failure falls back to export
            trace_error = err
            if method == "symbolic_trace":
                raise LoraFxError(f"symbolic_trace failed{_where(err)}: {err}; use capture "
                                  "method 'export'") from err
    with stage("capturing the model"):
        return _export(model, example_inputs, dynamic_shapes, trace_error)


def _export(model: nn.Module, example_inputs: tuple[Any, ...], dynamic_shapes: Any,
            trace_error: BaseException | None) -> fx.GraphModule:
    was_training = model.training
    model.eval()
    try:
        ep = _exported(model, tuple(example_inputs), dynamic_shapes, trace_error)
    finally:
        model.train(was_training)
    exported = ep.module()
    gm = PortableGraphModule(exported, exported.graph)  # follows .to(): graph.portable
    gm.meta[CAPTURE_KEY] = "export"
    gm.meta[PROGRAM_KEY] = ep  # ONNX export reuses it (capture.program)
    run_pass("dropout", dropout_pass, gm)
    run_pass("grouped_mm", grouped_pass, gm)  # MoE experts: no weight gradient when frozen
    run_pass("attention_dropout", attention_dropout_pass, gm, model)
    remember(gm, model, example_inputs, dynamic_shapes, capture_export)
    gm.train(was_training)
    return gm


def capture_export(model: nn.Module, example_inputs: tuple[Any, ...], dynamic_shapes: Any
                   ) -> fx.GraphModule:
    """``capture(..., method="export")``: how a dtype change captures again (recapture)."""
    return capture(model, example_inputs, dynamic_shapes, method="export")


def _exported(model: nn.Module, example_inputs: tuple[Any, ...], dynamic_shapes: Any,
              trace_error: BaseException | None) -> Any:
    """torch.export's program; a batch-1 example without ``dynamic_shapes`` is traced at
    batch 2 (``widened``) so that the batch stays dynamic, as given where that fails."""
    wide = widened(example_inputs) if dynamic_shapes is None else None
    if wide is not None:
        try:
            return _torch_export(model, wide, auto_dynamic(wide))
        except Exception:  # noqa: BLE001 - the model may need batch 1: trace it as given
            pass
    try:
        return _torch_export(model, example_inputs, dynamic_shapes if dynamic_shapes is not None
                             else auto_dynamic(example_inputs))
    except Exception as err:
        raise LoraFxError(_export_error(model, err, trace_error)) from err


def _torch_export(model: nn.Module, example_inputs: tuple[Any, ...], dynamic_shapes: Any
                  ) -> Any:
    # torch prints a partial graph to stderr on failure: the error says it in a line
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
            _no_mha_fastpath(), no_cache(model), exportable_experts(model):
        warnings.simplefilter("ignore")
        return torch.export.export(model, example_inputs, strict=False,
                                   dynamic_shapes=dynamic_shapes)


_HINTS = (  # (words in the error's type or message, what to do)
    (("DataDependent", "data-dependent"), "Python control flow or .item()/.tolist() reads a "
     "tensor's value there: use torch.where or torch.cond, or compute it outside forward()"),
    (("Cache", "cache"), "the model returns a cache object: set config.use_cache=False"),
    (("Constraints violated", "specializ"), "a dimension is fixed by the model: pass "
     "dynamic_shapes, or example inputs of the sizes you will use"),
    (("shapes cannot be multiplied", "size mismatch", "must match the size"),
     "example_inputs do not fit the model: fix their shapes"),
)


def _export_error(model: nn.Module, err: BaseException, trace_error: BaseException | None
                  ) -> str:
    """One line: the model, the failing op and line, the error, and what to do."""
    lines = str(err).strip().splitlines()
    first = lines[0] if lines else type(err).__name__
    text = f"{type(err).__name__} {first}"
    hint = next((h for words, h in _HINTS if any(w in text for w in words)),
                "rewrite that line with tensor operations, or report the model")
    ops = re.findall(r"torch\.ops\.(\w+\.\w+)", str(getattr(err, "partial_fx_graph", "")))
    op = f" after op {ops[-1]}" if ops else ""
    traced = " (symbolic_trace failed too)" if trace_error else ""
    return (f"cannot capture {type(model).__name__}: torch.export stopped{op}{_where(err)}"
            f"{traced}: {type(err).__name__}: {first[:300]}; fix: {hint}")

