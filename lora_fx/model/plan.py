"""Plan an injection without changing anything: capture, match, select, count.

``plan`` returns the captured graph, the chosen sites and every candidate not chosen with a
reason. Plan LoRA on models whose weights were never allocated (the meta device).

``plan_model`` reports the captured graph's sites and the exact parameter counts, computed
from shapes alone: a linear site with weight W [out, in] and rank r trains r·(in + out)
parameters (A: r×in, B: out×r); conv, embedding, fused and DoRA sites have their own shapes,
so each distinct site's branch is built on the meta device by the inject pass's own factory
and counted. For sites S

    trainable = Σ_{s∈S} |branch_s| + Σ (modules_to_save parameters)
    total     = (base parameters, each tensor once) + trainable

which is what PEFT's ``get_nb_trainable_parameters`` reports after injecting (a saved module is
counted twice in ``total``: the original and its trainable copy). Nothing here allocates a weight:
on the meta device a 175B model costs its module objects and graph (a few hundred MB).
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..capture.recapture import carry
from ..capture.trace import CAPTURE_KEY, capture
from ..config import LoraConfig
from ..errors import LoraFxError, some
from ..graph.copy import copy_graph
from ..graph.portable import graph_module
from ..graph.state import get_state
from ..load.meta import SkipMetaInit
from ..load.model import load_model
from ..match.matcher import Site, Skip, find_sites
from ..match.parameters import annotate, check_named
from ..match.select import select
from ..passes.inject import build_branch


def plan(model: nn.Module, example_inputs: tuple[Any, ...], config: LoraConfig,
         dynamic_shapes: Any = None) -> tuple[fx.GraphModule, list[Site], list[Skip]]:
    """Capture ``model`` and choose its sites for ``config``, without changing anything.

    Returns the captured graph, the chosen sites and every candidate not chosen with a reason.
    """
    if get_state(model) is not None:
        raise LoraFxError("this model already has LoRA branches: inject into the base model, "
                          "or merge first")
    gm = capture(model, example_inputs, dynamic_shapes)
    if gm is model:  # already captured: work on a copy, never on the caller's graph
        gm = graph_module(model, copy_graph(model.graph))
        gm.meta[CAPTURE_KEY] = model.meta[CAPTURE_KEY]
        carry(model, gm)
    sites, skips = find_sites(gm)
    chosen, rest = select(sites, config, model)  # target_modules / all-linear / target_forms
    for skip in skips:
        if config.targets(skip.name):
            raise LoraFxError(f"target {skip.name!r} cannot take a LoRA: {skip.reason}; "
                              "remove it from target_modules")
    check_named(config, gm, chosen)  # target_parameters: each names a site's weight
    annotate(chosen, model, config)  # ... oriented and keyed as PEFT's ParamWrapper
    if not chosen:
        raise LoraFxError(_no_match(config, [s.name for s in sites]))
    return gm, chosen, rest + skips


def _no_match(config: LoraConfig, names: list[str]) -> str:
    """One line: what was asked, the 3 closest sites (+N more), where to see them all."""
    wanted = config.target_modules
    keys = [str(wanted)] if isinstance(wanted, str) or wanted is None else \
        [str(k) for k in wanted]
    asked = repr(wanted) if len(repr(wanted)) <= 60 else repr(wanted)[:57] + "..."
    return (f"target_modules={asked} matches no site: closest: {some(names, keys)}; run "
            "`lorafx inspect MODEL` to list them")


@dataclass
class PlannedSite:
    """One chosen site: its weight's shape, rank, scale and trainable parameters."""

    name: str
    form: str
    layout: str
    in_features: int
    out_features: int
    r: int
    scale: float
    params: int   # linear: r·(in + out)


@dataclass
class PlanReport:
    """What injecting ``config`` would do, from shapes only."""

    capture: str
    sites: list[PlannedSite]
    skipped: list[dict[str, str]]
    trainable_params: int
    total_params: int
    saved_modules: list[str] = field(default_factory=list)

    def adapter_bytes(self, dtype: torch.dtype = torch.float16) -> int:
        """Size of the adapter's tensors: trainable parameters × bytes per element."""
        return adapter_bytes(self.trainable_params, dtype)

    def to_json(self) -> dict[str, Any]:
        return {"capture": self.capture,
                "sites": [dict(s.__dict__) for s in self.sites],
                "skipped": self.skipped, "trainable_params": self.trainable_params,
                "total_params": self.total_params, "modules_to_save": self.saved_modules,
                "adapter_bytes_fp16": self.adapter_bytes(torch.float16),
                "adapter_bytes_fp32": self.adapter_bytes(torch.float32)}


def adapter_bytes(trainable: int, dtype: torch.dtype = torch.float16) -> int:
    """Bytes of an adapter holding ``trainable`` parameters in ``dtype`` (tensors only)."""
    return trainable * torch.empty((), dtype=dtype, device="meta").element_size()


def saved_modules(gm: fx.GraphModule, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The modules ``modules_to_save`` names that hold parameters, outermost first (a saved
    module's children are saved with it): what inject copies and plan counts."""
    saved: list[tuple[str, nn.Module]] = []
    for name, mod in gm.named_modules():
        if not name or not config.saves(name) or any(name.startswith(s + ".") for s, _ in saved):
            continue
        if any(True for _ in mod.parameters()):
            saved.append((name, mod))
    return saved


def plan_model(model: nn.Module, example_inputs: tuple[Any, ...], config: LoraConfig,
               dynamic_shapes: Any = None) -> PlanReport:
    """Capture ``model`` (meta or real) and count what injecting ``config`` would train.

    Equal to ``count_parameters(inject(...))``; branches exist only on the meta device.
    """

    gm, chosen, skips = plan(model, example_inputs, config, dynamic_shapes)
    sites: dict[str, PlannedSite] = {}
    with SkipMetaInit():
        for s in chosen:  # a module called twice is one site with one branch, as in inject
            if s.name not in sites:
                branch = build_branch(s, config, torch.float32, torch.device("meta"))
                sites[s.name] = PlannedSite(
                    s.name, s.form, s.layout, s.in_features, s.out_features,
                    config.rank_for(s.name), config.scale_for(s.name),
                    sum(p.numel() for p in branch.parameters()))
    saved = [(name, sum(p.numel() for p in mod.parameters()))
             for name, mod in saved_modules(gm, config)]
    trainable = sum(s.params for s in sites.values()) + sum(n for _, n in saved)
    base = sum(p.numel() for p in gm.parameters())
    skipped = [{"name": k.name, "form": k.form, "reason": k.reason} for k in skips]
    return PlanReport(str(gm.meta.get(CAPTURE_KEY)), list(sites.values()), skipped, trainable,
                      base + trainable, [name for name, _ in saved])


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def plan_spec(spec: str, config: LoraConfig) -> tuple[PlanReport, dict[str, float]]:
    """Load MODEL ``spec`` on the meta device and plan ``config``; also time each phase.

    Returns the plan and ``{"load_s", "plan_s", "peak_rss_bytes"}``.
    """

    start = time.perf_counter()
    loaded = load_model(spec, meta=True)
    loaded_at = time.perf_counter()
    report = plan_model(loaded.module, loaded.example_inputs, config, loaded.dynamic_shapes)
    done = time.perf_counter()
    return report, {"load_s": round(loaded_at - start, 3), "plan_s": round(done - loaded_at, 3),
                    "peak_rss_bytes": float(peak_rss_bytes())}

