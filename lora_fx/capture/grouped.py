"""Capture fix-up: transformers' grouped expert matmul → ``lorafx::grouped_mm``.

``transformers::grouped_mm_fallback`` (what transformers' ``grouped_mm`` experts call while
traced) computes the weight gradient of every expert stack in its backward, also when the stack
is frozen; ``lorafx::grouped_mm`` (``lora_fx.grouped_mm``) is the same product whose backward
computes only the gradients asked for: under LoRA one expert GEMM less per stack and step. The
matcher takes both as expert sites (``match.rules``); ONNX translates both (``onnx.experts``).
"""

from __future__ import annotations

import torch
from torch import fx

from .. import grouped_mm as _registers_op  # noqa: F401 - registers lorafx::grouped_mm
from ..passes.runner import PassResult

FALLBACK = "transformers.grouped_mm_fallback.default"


def grouped_pass(gm: fx.GraphModule) -> PassResult:
    """Replace ``transformers::grouped_mm_fallback`` nodes by ``lorafx::grouped_mm``."""
    swapped = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and str(node.target) == FALLBACK:
            node.target = torch.ops.lorafx.grouped_mm.default
            swapped += 1
    return PassResult(gm, swapped > 0, {"swapped": swapped})
