"""An injected model after a dtype change: the base captured again, the same branches re-attached.

``graph.portable`` calls ``meta[REBUILD_KEY]`` when a cast changed the dtype of a captured
tensor. For an injected model that is :func:`reinject`: the eager model is captured again over
the module's own tensors (``capture.recapture``), the sites are found again by name, and the
existing branch modules (their A, B, m, already cast or not as the call decided) are inserted
as inject inserts them; nothing is re-initialized.
"""

from __future__ import annotations

import torch
from torch import fx

from ..capture.recapture import recapture
from ..errors import LoraFxError
from ..graph.attrs import add_submodule
from ..graph.state import STATE_KEY, require_state
from ..match.matcher import find_sites
from ..passes.inject import inject_pass
from ..passes.runner import run_pass
from ..passes.variant_hooks import variant_hooks_pass


def reinject(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm``'s base captured again in its current dtypes with ``gm``'s branches inserted."""
    state = require_state(gm)
    fresh = recapture(gm)
    sites, _ = find_sites(fresh)
    chosen = [s for s in sites if s.name in state.sites]
    missing = sorted(set(state.sites) - {s.name for s in chosen})
    if missing:
        raise LoraFxError(f"site {missing[0]!r} is not found in the model captured again for "
                          "its new dtype: cast the model before injecting")
    fresh.meta[STATE_KEY] = state
    for rec in state.sites.values():
        add_submodule(fresh, rec.branch, gm.get_submodule(rec.branch))
    run_pass("inject", inject_pass, fresh, chosen, state.config, state)  # inserts, builds none
    kept = {n: p.detach().clone() for n, p in fresh.named_parameters() if p.requires_grad}
    run_pass("variant_hooks", variant_hooks_pass, fresh)  # DoRA: wire y, W, b (resets m)
    with torch.no_grad():
        for n, p in fresh.named_parameters():
            if n in kept:
                p.copy_(kept[n])  # what was trained stays: nothing is re-initialized
    return fresh
