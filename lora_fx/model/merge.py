"""Merge: W' = W + s·B@A folded into every site's weight, no LoRA node left.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from .. import memory
from ..branches.base import LoraBranch
from ..capture.program import PROGRAM_KEY, weightless
from ..capture.recapture import carry
from ..capture.trace import CAPTURE_KEY
from ..errors import LoraFxError
from ..graph.attrs import set_attr_cow
from ..graph.copy import copy_graph
from ..graph.state import LoraState, get_state
from ..match.matcher import weight_readers
from ..passes.merge import erase_branches, merge_pass, site_uses
from ..passes.runner import run_pass
from ..progress import stage
from .params import branches
from .wrapper import like


def merge(gm: nn.Module, inplace: bool = False) -> fx.GraphModule:
    """A new GraphModule with every branch folded: W' = W + s·B@A, no LoRA node left.

    Neither ``gm`` nor the user's model is modified; only the merged weights are new tensors.
    A graph without branches is returned as a copy (merging twice is a no-op).

    ``inplace=True`` (big models: no second copy of the weights) folds W' into each weight's
    own storage, one site at a time: the user's model then holds W' too, and ``gm`` refuses to
    run (it would add the branches twice; its adapter can still be saved). Weights that other
    ops also read (ties) are copied as without ``inplace``.

    The result carries the capture's program without its weights (``fast.weightless``), so
    ``export_onnx(merged, merge=False)`` exports it without tracing the model again.
    """
    if not isinstance(gm, fx.GraphModule):
        raise LoraFxError("merge expects the GraphModule returned by lora_fx.inject")
    state = get_state(gm)
    graph = copy_graph(gm.graph)
    new = like(gm, graph)  # a LoraModel stays one: called like the model
    new.meta[CAPTURE_KEY] = gm.meta.get(CAPTURE_KEY, "export")
    carry(gm, new)  # follows .to(dtype) by capturing the base again
    if PROGRAM_KEY in gm.meta:  # export_onnx(new) then reuses the capture's graph
        new.meta[PROGRAM_KEY] = weightless(gm.meta[PROGRAM_KEY])
    if state is not None:
        for name in state.saved:  # modules_to_save copies are part of the merged model
            set_attr_cow(new, name, gm.get_submodule(name))
        with stage("merging the adapter"):
            rest = _fold_in_place(gm, new, state) if inplace else branches(gm)
            run_pass("merge", merge_pass, new, {n: state.sites[n] for n in rest}, rest)
            new.delete_all_unused_submodules()
    new.train(gm.training)
    return new


def without_branches(gm: nn.Module) -> nn.Module:
    """The injected ``gm`` with its branches erased and nothing folded: y = W x at every site,
    the base model (modules_to_save keep their trained copies). Shares ``gm``'s tensors; what
    verification compares a file's adapter effect against. A module without branches is
    returned as it is."""
    if not isinstance(gm, fx.GraphModule) or get_state(gm) is None:
        return gm
    graph = copy_graph(gm.graph)
    erase_branches(graph)
    base = like(gm, graph)
    base.meta[CAPTURE_KEY] = gm.meta.get(CAPTURE_KEY, "export")
    carry(gm, base)
    base.train(gm.training)
    return base


def _fold_in_place(gm: fx.GraphModule, new: fx.GraphModule,
                   state: LoraState) -> dict[str, LoraBranch]:
    """W ← W + ΔW (fp32, cast once) in W's storage for each site whose weight no other op
    reads; returns the branches left to fold by copy. ``gm`` then refuses to run."""

    readers, uses, rest = weight_readers(new), site_uses(new.graph), {}
    for name, branch in branches(gm).items():
        rec = state.sites[name]
        weight = new.get_parameter(rec.weight)
        if weight.is_meta or any(n not in uses[name] for n in readers[id(weight)]):
            rest[name] = branch
            continue
        with torch.no_grad():
            weight.copy_(branch.fold(weight, rec.layout, where=name))
    if len(rest) < len(state.sites):
        gm.register_forward_pre_hook(_merged_in_place)
    memory.trim()  # the freed ΔW buffers: not resident under the export that follows
    return rest


def _merged_in_place(module: nn.Module, args: Any) -> None:
    raise LoraFxError("this injected model was merged in place (merge(inplace=True)): its base "
                      "weights already hold the adapter; run the merged model, or inject into "
                      "a fresh base model")

