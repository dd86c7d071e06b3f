"""Verify an exported file: ONNX Runtime's outputs against PyTorch's, max |Δ| <= atol.

A cast export (fp16/bf16) allows ``DTYPE_RTOL[dtype] · max(1, max |y_fp32|)``.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .. import fileio
from ..deploy_format import DTYPE_RTOL
from ..errors import LoraFxError, LoraFxWarning
from ..ort import runtime
from ..progress import stage
from .report import ExportReport
from .shapes import second_shape, shape_text, symbolic_axes
from .stream import Layout, external_view
from .trace import eval_mode


def flat_outputs(out: Any) -> list[torch.Tensor]:
    """PyTorch outputs flattened as the exporter flattens them (tensors only)."""
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def forward(module: nn.Module, args: tuple[Any, ...]) -> list[torch.Tensor]:
    """``module(*args)`` in eval mode without grad, outputs flattened; the mode is restored."""
    with eval_mode(module), torch.no_grad():
        return flat_outputs(module(*args))


def torch_max_diff(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """max |got − want| over all outputs, in fp64."""
    return max((float((g.double() - w.double()).abs().max()) for g, w in
                zip(got, want, strict=True) if w.numel()), default=0.0)



def verify_file(report: ExportReport, inputs: tuple[Any, ...], want: list[torch.Tensor],
                atol: float = 1e-4, providers: list[Any] | None = None,
                dtype: str | None = None, lean: bool = False,
                layout: Layout | None = None, more: Sequence[Case] = ()) -> None:
    """Run ``report.path`` in ONNX Runtime on ``inputs`` and compare with PyTorch's outputs
    ``want``; raise above the tolerance. No model needs to be alive: for big models, compute
    ``want``, release the model, then verify (one copy of the weights at a time); ``lean``:
    a session that holds the weights once (``runtime.open_session``). ``layout``: the file
    was streamed by ``onnx_stream.write_model``; ONNX Runtime loads it through a view that
    maps its weights in place (``onnx_stream.external_view``) instead of copying them.

    CUDA runs with TF32 off (``runtime.verifying_session``); the tolerance (:func:`limit`) and
    its basis go to ``report.extras["verification"]``. Outputs come back through DLPack, so
    bf16 files verify too; one the provider cannot run (no bf16 kernels on the CPU) is
    reported unverified with a warning. ``more``: further (inputs, PyTorch outputs) pairs,
    each checked the same way (a second shape: ``second_case``);
    ``report.extras["verified_shapes"]`` lists the shapes run.
    """

    with stage("verifying in ONNX Runtime"):
        _verify(report, inputs, want, atol, providers, dtype, lean, layout, more)


def _verify(report: ExportReport, inputs: tuple[Any, ...], want: list[torch.Tensor],
            atol: float, providers: list[str] | None, dtype: str | None, lean: bool,
            layout: Layout | None, more: Sequence[Case]) -> None:
    try:
        with _loadable(report.path, layout) as model_file:
            sess, tf32 = runtime.verifying_session(model_file, providers, lean=lean)
        got = runtime.run_torch(sess, inputs)
        others = [(runtime.run_torch(sess, case_inputs), case_want)
                  for case_inputs, case_want in more]
    except LoraFxError as err:
        # no kernel for the dtype: ONNX Runtime's NOT_IMPLEMENTED status, or its reason alone
        no_kernel = ("NOT_IMPLEMENTED", "Could not find an implementation")
        if dtype not in ("bf16", "fp16") or not any(k in str(err) for k in no_kernel):
            raise
        warnings.warn(f"{report.path} not verified: ONNX Runtime cannot run {dtype} here "
                      f"({err}); run it on the CUDA provider", LoraFxWarning, stacklevel=2)
        report.extras["verify_skipped"] = str(err)
        return
    report.max_abs_diff = max([runtime.max_abs_diff_torch(got, want)]
                              + [runtime.max_abs_diff_torch(g, w) for g, w in others])
    report.extras["verified_shapes"] = [shape_text(inputs)] + [shape_text(i) for i, _ in more]
    report.provider = runtime.session_provider(sess)
    bound, basis = limit(atol, dtype, tf32, want)
    report.extras["verification"] = {"provider": report.provider,
                                     "tf32": None if report.provider != runtime.CUDA
                                     else ("on" if tf32 else "off"),
                                     "tolerance": bound, "basis": basis}
    if dtype is not None:
        report.extras.setdefault("error_vs_fp32", {})["onnxruntime"] = report.max_abs_diff
    if not report.max_abs_diff <= bound:
        raise LoraFxError(f"verification failed: max |ONNX Runtime - PyTorch| = "
                          f"{report.max_abs_diff:.3g} > {bound:g} ({basis}) on "
                          f"{report.provider}; the file {report.path} was written, do not "
                          "deploy it")


Case = tuple[tuple[Any, ...], list[torch.Tensor]]  # (inputs, PyTorch's outputs on them)


def second_case(model: Any, reference: nn.Module, example_inputs: tuple[Any, ...],
                cast: Callable[[tuple[Any, ...]], tuple[Any, ...]] = lambda a: a
                ) -> Case | None:
    """Inputs of another batch and length on the axes ``model`` (an ``onnx_ir.Model``) keeps
    symbolic, with ``reference``'s outputs on them; batch only where PyTorch refuses the length
    (a position limit), None (with a warning) where it refuses both or nothing is symbolic."""
    count = sum(isinstance(a, torch.Tensor) for a in example_inputs)
    axes = symbolic_axes(model, count)
    if axes is None:
        return None
    for length in (True, False):
        inputs = second_shape(tuple(example_inputs), axes, length)
        if inputs is None:
            return None
        try:  # a GraphModule prints the failing call's traceback to stderr: keep it quiet
            with contextlib.redirect_stderr(io.StringIO()):
                return cast(inputs), forward(reference, inputs)
        except Exception:  # noqa: BLE001 - the model's own limits: try a smaller change
            continue
    warnings.warn(f"the exported file was verified at the example's shape only: PyTorch fails "
                  f"at batch {shape_text(second_shape(tuple(example_inputs), axes, False) or ())}",
                  LoraFxWarning, stacklevel=2)
    return None


def limit(atol: float, dtype: str | None, tf32: bool, want: list[torch.Tensor]
          ) -> tuple[float, str]:
    """(tolerance, what it is derived from): ``atol`` for fp32 on fp32 math; a cast file
    ``DTYPE_RTOL[dtype] · max(1, max |y|)``; TF32 MatMuls ``TF32_RTOL · max(1, max |y|)``."""
    scale = max(1.0, max((float(w.abs().max()) for w in want if w.numel()), default=0.0))
    bound, basis = atol, f"atol {atol:g}"
    if dtype is not None and DTYPE_RTOL[dtype] * scale > bound:
        bound, basis = DTYPE_RTOL[dtype] * scale, f"{dtype}: {DTYPE_RTOL[dtype]:g} x max(1, max|y|)"
    if tf32 and runtime.TF32_RTOL * scale > bound:
        bound, basis = runtime.TF32_RTOL * scale, \
            f"TF32 on: {runtime.TF32_RTOL:g} x max(1, max|y|)"
    return bound, basis


@contextmanager
def _loadable(path: Path, layout: Layout | None) -> Iterator[Path]:
    """``path``, or for a file that ``write_model`` streamed, a temporary view of it written
    beside it and removed on exit (ONNX Runtime has mapped the weights by then); an error
    naming the view names ``path`` instead. Where the view cannot be written (disk full),
    ``path`` itself."""

    if layout is None:
        yield path
        return
    view = fileio.temp_path(path.parent, path.name)
    try:
        view.write_bytes(external_view(layout, path))
    except OSError:
        view.unlink(missing_ok=True)
        yield path
        return
    try:
        yield view
    except LoraFxError as err:
        raise LoraFxError(str(err).replace(str(view), str(path))) from err
    finally:
        view.unlink(missing_ok=True)

