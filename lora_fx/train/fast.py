"""Training-speed entry points over an injected GraphModule (results are unchanged).

``fuse_branches`` runs ``passes.fuse_branches`` in place; ``training_graph`` makes a copy of
the graph for training, branches fused, the written-out tanh GELU made one kernel
(``passes.fuse_gelu``), and wide linears (LM heads) computed in column blocks where that is
measured faster (``passes.wide_linear``); ``gm`` keeps the captured graph for save, merge and
export. ``compiled`` wraps ``torch.compile``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from ..errors import LoraFxError
from ..graph.copy import copy_graph
from ..graph.portable import REBUILD_KEY, graph_module
from ..graph.state import require_state
from ..model.portable import reinject
from ..passes.fuse_branches import fuse_branches_pass
from ..passes.fuse_gelu import fuse_gelu_pass
from ..passes.runner import run_pass
from ..passes.wide_linear import wide_linear_pass


def fuse_branches(gm: nn.Module) -> fx.GraphModule:
    """Fuse every branch of an injected GraphModule in place (see module doc); returns it.

    Outputs, gradients, ``lora_parameters``, ``save_adapter`` and ``merge`` are unchanged.
    """
    if not isinstance(gm, fx.GraphModule):
        raise LoraFxError("fuse_branches expects the GraphModule returned by lora_fx.inject")
    return run_pass("fuse_branches", fuse_branches_pass, gm).gm


def training_graph(gm: nn.Module) -> fx.GraphModule:
    """A faster graph for training ``gm``: a copy of its graph over the same parameters and
    modules, with the branches fused (``fuse_branches``), every written-out tanh GELU made
    one ``aten.gelu`` (``passes.fuse_gelu``), and every linear of ≥ 8192 outputs routed
    through ``passes.wide_linear`` (column blocks where the first call measures them faster).

    Train the copy: the optimizer takes ``lora_parameters(gm)`` (the same tensors). Save,
    merge and export ``gm`` itself, whose graph stays the captured one, so that the merged ONNX
    file is exactly the base model's graph. Outputs and gradients equal ``gm``'s to fp32
    rounding (the fused GELU differs from the written-out one by ~1e-7 relative).
    """

    if not isinstance(gm, fx.GraphModule):
        raise LoraFxError("training_graph expects the GraphModule returned by lora_fx.inject")
    require_state(gm)
    train = graph_module(gm, copy_graph(gm.graph), class_name=type(gm).__name__)
    train.meta = dict(gm.meta)
    train.train(gm.training)
    return _speed_passes(train)


def _speed_passes(train: fx.GraphModule) -> fx.GraphModule:
    """Fused branches, one-kernel GELU, blocked wide linears (``training_graph``'s passes)."""
    run_pass("fuse_branches", fuse_branches_pass, train)
    run_pass("fuse_gelu", fuse_gelu_pass, train)
    train = run_pass("wide_linear", wide_linear_pass, train).gm
    train.meta[REBUILD_KEY] = _retrain  # a cast captures again, then these passes again
    return train


def _retrain(train: fx.GraphModule) -> fx.GraphModule:
    """``train``'s graph for its new dtype: the base captured again, branches, speed passes."""
    fresh = reinject(train)
    fresh.train(train.training)
    return _speed_passes(fresh)


def compiled(gm: nn.Module, fuse: bool = True, **options: Any) -> Any:
    """``torch.compile`` of an injected GraphModule (branches fused first by default).

    Returns the compiled callable; parameters stay those of ``gm`` (train, save and merge
    ``gm`` itself). ``options`` go to ``torch.compile`` (e.g. ``mode="max-autotune"``).
    """
    if fuse:
        fuse_branches(gm)
    return torch.compile(gm, **options)

