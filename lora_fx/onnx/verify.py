"""Verify an exported file: ONNX Runtime's outputs against PyTorch's on each case, within the
limit of ``onnx.limits`` (atol + rtol · max |y|, bounded by the adapter's own effect).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .. import fileio
from ..errors import LoraFxError, LoraFxWarning
from ..ort import runtime
from ..ort.adapters import read_ort_adapter
from ..progress import stage
from .limits import judge, max_diff, refuse
from .report import ExportReport
from .shapes import shape_text
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
    """max |got − want| over all outputs, in fp64 (``limits.max_diff``)."""
    return max_diff(got, want)



@dataclass
class Case:
    """One run of the file: its feeds (positional, or by input name), PyTorch's outputs
    ``want`` on them, ``base``: PyTorch's outputs without the adapter (None where the case
    runs none), ``adapter``: an ONNX Runtime adapter file made active for the run."""

    name: str
    inputs: tuple[Any, ...] | dict[str, Any]
    want: list[torch.Tensor]
    base: list[torch.Tensor] | None = None
    adapter: Path | None = None


def verify_file(report: ExportReport, inputs: tuple[Any, ...], want: list[torch.Tensor],
                atol: float | None = None, providers: list[Any] | None = None,
                dtype: str | None = None, lean: bool = False,
                layout: Layout | None = None, more: Sequence[Case] = (),
                base: list[torch.Tensor] | None = None) -> None:
    """Run ``report.path`` in ONNX Runtime on ``inputs`` and compare with PyTorch's outputs
    ``want`` (``base``: PyTorch's outputs without the adapter); raise above the limit of
    ``onnx.limits``. No model needs to be alive: for big models, compute ``want``, release
    the model, then verify (one copy of the weights at a time); ``lean``: a session that holds
    the weights once (``runtime.open_session``). ``layout``: the file was streamed by
    ``onnx_stream.write_model``; ONNX Runtime loads it through a view that maps its weights in
    place (``onnx_stream.external_view``) instead of copying them.

    CUDA runs with TF32 off (``runtime.verifying_session``); each case's check goes to
    ``report.checks``, the example's limit and basis to ``report.extras["verification"]``.
    Outputs come back through DLPack, so bf16 files verify too; one the provider cannot run
    (no bf16 kernels on the CPU) is reported unverified with a warning. ``more``: further
    cases, each checked the same way (a second shape: ``second_case``);
    ``report.extras["verified_shapes"]`` lists the shapes run.
    """

    verify_cases(report, [Case("example", inputs, want, base), *more], atol, providers,
                 dtype, lean, layout)


def verify_cases(report: ExportReport, cases: Sequence[Case], atol: float | None = None,
                 providers: list[Any] | None = None, dtype: str | None = None,
                 lean: bool = False, layout: Layout | None = None) -> None:
    """The one verification of every export: each case run in one ONNX Runtime session and
    judged (``onnx.limits``); see :func:`verify_file`."""
    dtype = None if dtype == "fp32" else dtype
    with stage("verifying in ONNX Runtime"):
        _verify(report, list(cases), atol, providers, dtype, lean, layout)


def _run(sess: Any, case: Case) -> list[torch.Tensor]:
    """``case`` run through I/O binding; an adapter file's A', B' bound as the inputs they
    override (what ``RunOptions.add_active_adapter`` does for a plain run)."""
    if case.adapter is None:
        return runtime.run_torch(sess, case.inputs)
    if not isinstance(case.inputs, dict):
        raise LoraFxError("internal error: a case with an adapter file feeds inputs by name")
    return runtime.run_torch(sess, {**case.inputs, **read_ort_adapter(case.adapter)})


def _verify(report: ExportReport, cases: list[Case], atol: float | None,
            providers: list[str] | None, dtype: str | None, lean: bool,
            layout: Layout | None) -> None:
    try:
        with _loadable(report.path, layout) as model_file:
            sess, tf32 = runtime.verifying_session(model_file, providers, lean=lean)
        got = [_run(sess, case) for case in cases]
    except LoraFxError as err:
        # no kernel for the dtype: ONNX Runtime's NOT_IMPLEMENTED status, or its reason alone
        no_kernel = ("NOT_IMPLEMENTED", "Could not find an implementation")
        if dtype not in ("bf16", "fp16") or not any(k in str(err) for k in no_kernel):
            raise
        warnings.warn(f"{report.path} not verified: ONNX Runtime cannot run {dtype} here "
                      f"({err}); run it on the CUDA provider", LoraFxWarning, stacklevel=2)
        report.extras["verify_skipped"] = str(err)
        return
    report.provider = runtime.session_provider(sess)
    report.checks = [judge(case.name, out, case.want, dtype or "fp32", case.base, tf32, atol)
                     for case, out in zip(cases, got, strict=True)]
    report.max_abs_diff = max(c.max_abs_diff for c in report.checks)
    report.extras["verified_shapes"] = [shape_text(tuple(case.inputs.values()) if isinstance(
        case.inputs, dict) else case.inputs) for case in cases]
    first = report.checks[0]
    report.extras["verification"] = {"provider": report.provider,
                                     "tf32": None if report.provider != runtime.CUDA
                                     else ("on" if tf32 else "off"),
                                     "tolerance": first.limit, "basis": first.basis}
    if dtype is not None:
        report.extras.setdefault("error_vs_fp32", {})["onnxruntime"] = report.max_abs_diff
    refuse(report.checks, report.provider, report.path)


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

