"""How far an exported file may be from PyTorch, and the one comparison every export runs.

For outputs y (PyTorch, fp32) and ŷ (ONNX Runtime), err = max |ŷ − y| over every output. The
limit scales with the outputs, as fp32 reordering grows with depth and magnitude:

    L(p) = atol(p) + rtol(p) · max |y|        for the file's precision p (fp32, fp16, bf16)

(TF32 MatMuls on CUDA: at least ``atol + TF32_RTOL · max |y|``). Where the case runs an adapter,
its own effect E = max |y − y_base| (y_base: the same inputs without the adapter) bounds the
limit too, so that a file that lost or mis-scaled its adapter fails even where L is loose:

    limit = min(L(p), max(share(p) · E, L(fp32)))

A file without its adapter has err = E, one with B scaled by c has err = |c − 1| · E: both
fail wherever share · E or L(fp32) is below E. Never below L(fp32), since fp32 reordering is no
error; where E <= limit the check cannot tell the file from one without its adapter, and the
check says so (``Check.blind``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..deploy_format import TF32_RTOL, as_torch, max_diff
from ..errors import LoraFxError


@dataclass(frozen=True)
class Tolerance:
    """One precision's limit: ``atol + rtol · max |y|``, and the share of the adapter's own
    effect that the error may reach; ``norm``: the limit is on the relative error
    |ŷ − y|₂ / |y|₂ instead (``rtol``), for quantized weights whose rounding is spread over
    every output rather than bounded per element."""

    atol: float
    rtol: float
    share: float
    norm: bool = False


# fp32: reordering over 30 layers with logits ~40 gives 3.4e-4 (a 135M LLaMA, ORT on the CPU);
# fp16/bf16: the cast file against fp32 PyTorch (10 and 7 mantissa bits).
# int4/int8 (weight-only, against fp32): a sanity bound on |ŷ − y|₂ / |y|₂ (the same function,
# rounded), not a measure of quality; whether a merged adapter survived is onnx.survival's
# question, so the adapter's effect bounds nothing here
TOLERANCES = {"fp32": Tolerance(1e-4, 2e-5, 0.05), "fp16": Tolerance(2e-3, 1e-2, 0.25),
              "bf16": Tolerance(1e-2, 6e-2, 0.5), "int8": Tolerance(0.0, 0.1, math.inf, True),
              "int4": Tolerance(0.0, 0.5, math.inf, True)}


@dataclass
class Check:
    """One verified case: its error against PyTorch, the limit, and what the limit is made of."""

    name: str                      # "example", "batch 3 x 11", "decode", "prefill+adapter", ...
    max_abs_diff: float
    limit: float
    basis: str
    effect: float | None = None    # max |y − y_base|: the adapter's own effect (None: no adapter)
    relative: float | None = None  # |ŷ − y|₂ / |y|₂ where the limit is on it (int4, int8)

    @property
    def error(self) -> float:
        """What the limit bounds: max |ŷ − y|, or the relative error."""
        return self.max_abs_diff if self.relative is None else self.relative

    @property
    def ok(self) -> bool:
        return self.error <= self.limit

    @property
    def blind(self) -> bool:
        """True when a file without its adapter would pass this case too."""
        return self.relative is None and self.effect is not None and self.effect <= self.limit


def magnitude(values: Sequence[Any]) -> float:
    """max |y| over all floating outputs."""
    return max((float(v.detach().abs().max()) for v in as_torch(values)
                if v.numel() and v.is_floating_point()), default=0.0)


def relative_error(got: Sequence[Any], want: Sequence[Any]) -> float:
    """|got − want|₂ / |want|₂ over all outputs together, in fp64."""
    num = sum(float(((g.double() - w.double()) ** 2).sum())
              for g, w in zip(as_torch(got), as_torch(want), strict=True))
    den = sum(float((w.double() ** 2).sum()) for w in as_torch(want))
    return (num / den) ** 0.5 if den else (0.0 if not num else math.inf)


def limit(want: Sequence[Any], dtype: str = "fp32", base: Sequence[Any] | None = None,
          tf32: bool = False, atol: float | None = None) -> tuple[float, str, float | None]:
    """(limit, its basis in words, the adapter's effect E) for PyTorch's outputs ``want``
    (see the module docstring); ``base``: the outputs without the adapter; ``atol``
    overrides the precision's own."""
    tol, exact = TOLERANCES[dtype], TOLERANCES["fp32"]
    effect = None if base is None else max_diff(want, base)
    if tol.norm:
        return tol.rtol, f"{dtype}: |y_onnx - y|/|y| <= {tol.rtol:g}", effect
    top = magnitude(want)
    a = tol.atol if atol is None else atol
    noise, basis = a + tol.rtol * top, f"{a:g} + {tol.rtol:g} x max|y| {top:.3g}"
    if dtype != "fp32":
        basis = f"{dtype}: {basis}"
    if tf32 and a + TF32_RTOL * top > noise:
        noise, basis = a + TF32_RTOL * top, f"TF32 on: {a:g} + {TF32_RTOL:g} x max|y| {top:.3g}"
    floor = (exact.atol if atol is None else atol) + exact.rtol * top
    if effect is not None and max(tol.share * effect, floor) < noise:
        bound = max(tol.share * effect, floor)
        return bound, (f"{tol.share:g} x the adapter's effect {effect:.3g}" if bound > floor
                       else f"fp32's {floor:.3g}") + f", under {basis}", effect
    return noise, basis, effect


def judge(name: str, got: Sequence[Any], want: Sequence[Any], dtype: str = "fp32",
          base: Sequence[Any] | None = None, tf32: bool = False,
          atol: float | None = None) -> Check:
    """The check of one case: ONNX Runtime's ``got`` against PyTorch's ``want``."""
    bound, basis, effect = limit(want, dtype, base, tf32, atol)
    relative = relative_error(got, want) if TOLERANCES[dtype].norm else None
    return Check(name, max_diff(got, want), bound, basis, effect, relative)


def refuse(checks: Sequence[Check], provider: str | None, path: Any) -> None:
    """Raise for the check furthest over its limit: one line with the error, the limit and its
    basis, what it means and what to do; nothing when every check holds."""
    worst = max(checks, key=lambda c: c.error / c.limit if c.limit else np.inf)
    if worst.ok:
        return
    lost = ""
    if worst.relative is not None:
        raise LoraFxError(f"verification failed ({worst.name}): |ONNX Runtime - PyTorch| / "
                          f"|PyTorch| = {worst.relative:.3g} > {worst.limit:g} on {provider}: "
                          f"the quantized file {path} is not the model rounded, do not deploy "
                          "it; try a smaller --quant-block or int8")
    if worst.effect:
        lost = (f"; that is {worst.max_abs_diff / worst.effect:.0%} of the adapter's own effect "
                f"{worst.effect:.3g}, so the file may have lost or mis-scaled its adapter")
    raise LoraFxError(f"verification failed ({worst.name}): max |ONNX Runtime - PyTorch| = "
                      f"{worst.max_abs_diff:.3g} > {worst.limit:.3g} ({worst.basis}) on "
                      f"{provider}{lost}; the file {path} was written, do not deploy it "
                      "(if this error is expected, raise the limit with --atol)")
