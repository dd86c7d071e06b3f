"""``lorafx::grouped_mm``: a grouped expert matmul whose backward computes only the gradients
asked for (used by the capture fix-up ``capture.grouped`` and the expert branches).

transformers' ``grouped_mm`` experts, traced, call the custom op
``transformers::grouped_mm_fallback(x, W, offs)``: row block e of x (sorted by expert, rows
[offs[e-1], offs[e])) times W[e]. Its registered backward always computes both
dx = dy W_eᵀ and dW_e = x_eᵀ dy, a second full expert GEMM per stack, also when W is frozen,
as under LoRA, where only dx (and the branches' factor gradients) are needed.
``lorafx::grouped_mm`` computes the same product (one ``mm`` per expert that has rows; rows past
offs[-1] are 0) and its backward computes dx and dW only where the inputs require grad. ONNX
translates it (``onnx.experts``).
"""

from __future__ import annotations

from typing import Any

import torch


def _blocks(offs: torch.Tensor) -> list[tuple[int, int, int]]:
    """(expert, start, end) of each non-empty row block."""
    out, start = [], 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out.append((e, start, int(end)))
            start = int(end)
    return out


@torch.library.custom_op("lorafx::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """y[i] = x[i] @ w[e] for the rows i of block e: x [S, k], w [E, k, m], offs [E]."""
    y = x.new_empty(x.shape[0], w.shape[-1])
    blocks = _blocks(offs)
    for e, start, end in blocks:
        torch.mm(x[start:end], w[e], out=y[start:end])
    y[blocks[-1][2] if blocks else 0:].zero_()  # rows past offs[-1]
    return y


@grouped_mm.register_fake
def _grouped_mm_fake(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("lorafx::grouped_mm_backward", mutates_args=())
def grouped_mm_backward(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, dy: torch.Tensor,
                        want_dx: bool, want_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dW): dx[i] = dy[i] w[e]ᵀ, dW[e] = x_eᵀ dy_e, each only where wanted (else 0)."""
    blocks = _blocks(offs)
    dx = torch.empty_like(x) if want_dx else x.new_zeros(0)
    if want_dx:
        dx[blocks[-1][2] if blocks else 0:].zero_()  # rows past offs[-1]
    dw = torch.zeros_like(w) if want_dw else w.new_zeros(0)
    for e, start, end in blocks:
        if want_dx:
            torch.mm(dy[start:end], w[e].t(), out=dx[start:end])
        if want_dw:
            torch.mm(x[start:end].t(), dy[start:end], out=dw[e])
    return dx, dw


@grouped_mm_backward.register_fake
def _grouped_mm_backward_fake(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor,
                              dy: torch.Tensor, want_dx: bool, want_dw: bool
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty_like(x) if want_dx else x.new_empty(0),
            torch.empty_like(w) if want_dw else w.new_empty(0))


def _setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(inputs[0], inputs[1], inputs[2])


def _backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, Any, None]:
    x, w, offs = ctx.saved_tensors
    want_dx, want_dw = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
    dx, dw = grouped_mm_backward(x, w, offs, dy.contiguous(), want_dx, want_dw)
    return (dx if want_dx else None), (dw if want_dw else None), None


grouped_mm.register_autograd(_backward, setup_context=_setup)
