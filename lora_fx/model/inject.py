"""Inject: capture, select, add a branch per site, freeze all but A, B (and modules_to_save).

The result computes ``model``'s function plus Δ(x) = s·B(A(x)) at each site; its base
parameters are shared with ``model`` and never modified.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import fx, nn

from ..config import LoraConfig
from ..errors import LoraFxError
from ..graph.attrs import set_attr_cow
from ..graph.portable import REBUILD_KEY
from ..graph.state import STATE_KEY, LoraState
from ..passes.inject import inject_pass
from ..passes.runner import run_pass
from ..passes.variant_hooks import variant_hooks_pass
from ..variants.init import init_from_weights
from .plan import plan, saved_modules
from .portable import reinject
from .wrapper import LoraModel, as_model


def inject(model: nn.Module, example_inputs: tuple[Any, ...], config: LoraConfig,
           dynamic_shapes: Any = None) -> LoraModel:
    """Capture ``model`` and add a LoRA branch at every site ``config`` targets.

    The returned GraphModule computes what ``model`` did plus Δ(x) = s·B(A(x)) at each site; its
    base parameters are frozen (shared with ``model``, never modified), only A, B and the
    ``modules_to_save`` copies train. It is called like ``model`` (``model.wrapper``).
    """
    gm, chosen, _ = plan(model, example_inputs, config, dynamic_shapes)
    state = LoraState(config)
    gm.meta[STATE_KEY] = state
    gm.meta[REBUILD_KEY] = reinject  # a cast captures again (graph.portable)
    run_pass("inject", inject_pass, gm, chosen, config, state)
    init_from_weights(gm)  # PiSSA / OLoRA: A₀, B₀ from W, W → W − s·B₀A₀ (else a no-op)
    run_pass("variant_hooks", variant_hooks_pass, gm)  # DoRA: wire y, W, b; set m
    for p in gm.parameters():
        p.requires_grad_(False)
    for rec in state.sites.values():
        for p in gm.get_submodule(rec.branch).parameters():
            p.requires_grad_(True)
    state.saved = _copy_saved_modules(gm, config)
    gm.train(model.training)
    return as_model(gm, model, example_inputs)


def _copy_saved_modules(gm: fx.GraphModule, config: LoraConfig) -> list[str]:
    """modules_to_save: give each named module trainable copies of its parameters."""
    saved: list[str] = []
    for name, mod in saved_modules(gm, config):
        twin = copy.deepcopy(mod)
        for p in twin.parameters():
            p.requires_grad_(True)
        set_attr_cow(gm, name, twin)
        saved.append(name)
    if config.modules_to_save and not saved:
        raise LoraFxError(f"modules_to_save={config.modules_to_save!r} matches no module with "
                          "parameters: name a module of the model (e.g. the task head)")
    return saved

