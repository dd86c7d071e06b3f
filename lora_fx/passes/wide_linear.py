"""Wide linears in column blocks when the BLAS is faster that way, measured (training speed).

A linear with many outputs (an LM head: N = 50257 for GPT-2) is one GEMM writing an [M, N]
output. Some BLAS run it well below their peak when N is not a multiple of their vector width
(benchmarks/README.md). The same product in blocks of C = 4096 output features,

    y[:, j:j+C] = x W[j:j+C]ᵀ (+ b[j:j+C])        j = 0, C, 2C, ...

computes each block into an aligned [M, C] buffer and copies it into place: the same dot
products over the same K inputs, and only one block of extra memory. Faster on some shapes and
slower on others (benchmarks/README.md), so it is never assumed: the first call for a (N, K,
dtype, threads) times both ways on its real input, alternately, and keeps blocks only if they
are at least 5% faster. CPU only; elsewhere, and under ``torch.compile``, it is ``F.linear``.

Backward is unchanged, one GEMM per gradient: dx = g W, dW = gᵀ x, db = Σ g.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from ..graph.attrs import resolve_attr
from .runner import PassResult

BLOCK = 4096          # output features per block
MIN_WIDTH = 8192      # narrower linears are left alone
MIN_GAIN = 0.95       # blocks must take at most this fraction of the plain GEMM's time
TRIALS = 3            # timed calls of each way (after one warm-up each)

_choice: dict[tuple[Any, ...], bool] = {}   # (N, K, dtype, threads) -> use blocks


def _blocked(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x Wᵀ + b, C output features at a time through one aligned [M, C] buffer."""
    x2 = x.reshape(-1, x.shape[-1])
    out = x2.new_empty(x2.shape[0], w.shape[0])
    buf = x2.new_empty(x2.shape[0], min(BLOCK, w.shape[0]))
    for j in range(0, w.shape[0], BLOCK):
        blk = w[j:j + BLOCK]
        full = blk.shape[0] == buf.shape[1]
        part = torch.mm(x2, blk.t(), out=buf) if full else x2 @ blk.t()
        if b is not None:
            part.add_(b[j:j + BLOCK])
        out[:, j:j + blk.shape[0]].copy_(part)
    return out.reshape(*x.shape[:-1], w.shape[0])


class _BlockedLinear(torch.autograd.Function):
    """Forward in blocks (``_blocked``); backward the plain linear's gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor,
                b: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _blocked(x, w, b)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        dx = (g2 @ w).reshape(x.shape) if ctx.needs_input_grad[0] else None
        dw = g2.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        db = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def _seconds(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _tune(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    """True when blocks beat the plain GEMM by ``MIN_GAIN`` on this input (median of TRIALS,
    after one warm-up round of each)."""
    with torch.no_grad():
        rounds = [(_seconds(lambda: F.linear(x, w, b)), _seconds(lambda: _blocked(x, w, b)))
                  for _ in range(TRIALS + 1)][1:]
    plain, blocks = zip(*rounds, strict=True)
    return statistics.median(blocks) <= MIN_GAIN * statistics.median(plain)


def wide_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None
                ) -> torch.Tensor:
    """``F.linear(x, w, b)``, computed in column blocks where that was measured faster."""
    if x.device.type != "cpu" or torch.compiler.is_compiling() or x.dim() < 2:
        return F.linear(x, w, b)
    key = (w.shape[0], w.shape[1], x.dtype, torch.get_num_threads())
    if key not in _choice:
        _choice[key] = _tune(x, w, b)
    if not _choice[key]:
        return F.linear(x, w, b)
    return _BlockedLinear.apply(x, w, b)  # type: ignore[no-any-return]


def _weight(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads, else None."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    value = resolve_attr(gm, str(node.target))
    return value if isinstance(value, torch.Tensor) else None


def wide_linear_pass(gm: fx.GraphModule, min_width: int = MIN_WIDTH) -> PassResult:
    """Route every ``aten.linear`` over a stored weight of ≥ ``min_width`` outputs through
    ``wide_linear`` (which decides, per shape, by measurement)."""
    routed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        w = _weight(gm, node.args[1])
        if w is None or w.dim() != 2 or w.shape[0] < min_width:
            continue
        node.target = wide_linear
        routed += 1
    return PassResult(gm, routed > 0, {"wide_linears": routed})
