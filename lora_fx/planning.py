"""Plan LoRA on models whose weights were never allocated (the meta device).

A plan is the captured graph's sites and the exact parameter counts, computed from shapes alone:
a linear site with weight W [out, in] and rank r trains r·(in + out) parameters (A: r×in,
B: out×r); conv, embedding, fused and DoRA sites have their own shapes, so each distinct site's
branch is built on the meta device by the inject pass's own factory and counted. For sites S

    trainable = Σ_{s∈S} |branch_s| + Σ (modules_to_save parameters)
    total     = (base parameters, each tensor once) + trainable

which is what PEFT's ``get_nb_trainable_parameters`` reports after injecting (a saved module is
counted twice in ``total``: the original and its trainable copy). Nothing here allocates a weight:
on the meta device a 175B model costs its module objects and graph (a few hundred MB).

Building a model on the meta device still runs its initializers (``nn.init.normal_`` …): they do
no work there, but the first ``normal_`` on a meta tensor imports ``torch._dynamo`` (seconds).
:func:`meta_device` skips every initializer whose tensor is on the meta device.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from .config import LoraConfig

_INIT_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    [getattr(nn.init, n) for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    + [torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_,
       torch.Tensor.exponential_, torch.Tensor.log_normal_, torch.Tensor.random_,
       torch.Tensor.bernoulli_, torch.Tensor.geometric_, torch.Tensor.cauchy_])


class SkipMetaInit(TorchFunctionMode):
    """Initializers (``nn.init.*_``, ``Tensor.normal_`` …) return meta tensors untouched."""

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _INIT_FUNCTIONS:
            target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """``torch.device("meta")`` for everything built inside, initializers skipped."""
    with torch.device("meta"), SkipMetaInit():
        yield


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


def _saved_modules(gm: fx.GraphModule, config: LoraConfig) -> list[tuple[str, int]]:
    """(path, parameter count) of each module that ``modules_to_save`` copies (as api.inject)."""
    saved: list[tuple[str, int]] = []
    for name, mod in gm.named_modules():
        if not name or not config.saves(name) or any(name.startswith(s + ".") for s, _ in saved):
            continue
        count = sum(p.numel() for p in mod.parameters())
        if count:
            saved.append((name, count))
    return saved


def plan_model(model: nn.Module, example_inputs: tuple[Any, ...], config: LoraConfig,
               dynamic_shapes: Any = None) -> PlanReport:
    """Capture ``model`` (meta or real) and count what injecting ``config`` would train.

    Equal to ``api.count_parameters(api.inject(...))``; branches exist only on the meta device.
    """
    from .api import plan
    from .capture import CAPTURE_KEY
    from .passes.inject import build_branch

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
    saved = _saved_modules(gm, config)
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
    from .load import load_model

    start = time.perf_counter()
    loaded = load_model(spec, meta=True)
    loaded_at = time.perf_counter()
    report = plan_model(loaded.module, loaded.example_inputs, config, loaded.dynamic_shapes)
    done = time.perf_counter()
    return report, {"load_s": round(loaded_at - start, 3), "plan_s": round(done - loaded_at, 3),
                    "peak_rss_bytes": float(peak_rss_bytes())}
