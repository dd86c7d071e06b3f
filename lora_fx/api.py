"""The Python API: inject, merge, save_adapter, load_adapter (see DESIGN.md §2)."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from . import memory
from .adapters import Adapter, read_adapter, write_adapter
from .branches import LoraBranch, LoraFused
from .capture import CAPTURE_KEY, capture
from .config import LoraConfig
from .errors import LoraFxError
from .fast import PROGRAM_KEY, weightless
from .passes.inject import inject_pass
from .passes.merge import merge_pass
from .passes.runner import run_pass
from .passes.state import STATE_KEY, LoraState, get_state, require_state, set_attr_cow
from .patterns import Site, Skip, find_sites, select
from .variants.dora import attach, load_magnitudes, magnitudes
from .variants.init import init_from_weights, reads_weight


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
        gm = fx.GraphModule(model, _copy_graph(model.graph))
        gm.meta[CAPTURE_KEY] = model.meta[CAPTURE_KEY]
    sites, skips = find_sites(gm)
    chosen, rest = select(sites, config, model)  # target_modules / all-linear / target_forms
    for skip in skips:
        if config.targets(skip.name):
            raise LoraFxError(f"target {skip.name!r} cannot take a LoRA: {skip.reason}; "
                              "remove it from target_modules")
    if not chosen:
        raise LoraFxError(_no_match(config, [s.name for s in sites]))
    return gm, chosen, rest + skips


def _no_match(config: LoraConfig, names: list[str]) -> str:
    wanted = config.target_modules
    keys = [wanted] if isinstance(wanted, str) or wanted is None else list(wanted)
    leaves = sorted({n.split(".")[-1] for n in names})
    close = sorted({c for k in keys if k for c in difflib.get_close_matches(str(k), leaves, 3,
                                                                            0.5)})
    hint = f"closest: {', '.join(close)}; " if close else ""
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return (f"target_modules={wanted!r} matches no site; {hint}sites are: {shown or 'none'} "
            "(run `lorafx inspect MODEL` to list them)")


def inject(model: nn.Module, example_inputs: tuple[Any, ...], config: LoraConfig,
           dynamic_shapes: Any = None) -> fx.GraphModule:
    """Capture ``model`` and add a LoRA branch at every site ``config`` targets.

    The returned GraphModule computes what ``model`` did plus Δ(x) = s·B(A(x)) at each site; its
    base parameters are frozen (shared with ``model``, never modified), only A, B and the
    ``modules_to_save`` copies train.
    """
    gm, chosen, _ = plan(model, example_inputs, config, dynamic_shapes)
    state = LoraState(config)
    gm.meta[STATE_KEY] = state
    run_pass("inject", inject_pass, gm, chosen, config, state)
    init_from_weights(gm)  # PiSSA / OLoRA: A₀, B₀ from W, W → W − s·B₀A₀ (else a no-op)
    attach(gm)  # DoRA: wire y, W, b into each branch, m = ‖W + s·B@A‖ (else a no-op)
    for p in gm.parameters():
        p.requires_grad_(False)
    for rec in state.sites.values():
        for p in gm.get_submodule(rec.branch).parameters():
            p.requires_grad_(True)
    state.saved = _copy_saved_modules(gm, config)
    gm.train(model.training)
    return gm


def _copy_saved_modules(gm: fx.GraphModule, config: LoraConfig) -> list[str]:
    """modules_to_save: give each named module trainable copies of its parameters."""
    saved: list[str] = []
    for name, mod in list(gm.named_modules()):
        if not name or not config.saves(name) or any(name.startswith(s + ".") for s in saved):
            continue
        if not any(True for _ in mod.parameters()):
            continue
        twin = copy.deepcopy(mod)
        for p in twin.parameters():
            p.requires_grad_(True)
        set_attr_cow(gm, name, twin)
        saved.append(name)
    if config.modules_to_save and not saved:
        raise LoraFxError(f"modules_to_save={config.modules_to_save!r} matches no module with "
                          "parameters: name a module of the model (e.g. the task head)")
    return saved


def branches(gm: nn.Module) -> dict[str, LoraBranch]:
    """The branch module of each injected site."""
    state = require_state(gm)
    out: dict[str, LoraBranch] = {}
    for name, rec in state.sites.items():
        mod = gm.get_submodule(rec.branch)
        assert isinstance(mod, LoraBranch)
        out[name] = mod
    return out


def lora_parameters(gm: nn.Module) -> list[torch.Tensor]:
    """A and B of every site, then the modules_to_save parameters (the trainable set)."""
    state = require_state(gm)
    params: list[torch.Tensor] = [p for b in branches(gm).values() for p in b.parameters()]
    for name in state.saved:
        params.extend(gm.get_submodule(name).parameters())
    return params


def count_parameters(gm: nn.Module) -> tuple[int, int]:
    """(trainable, total) as PEFT's get_nb_trainable_parameters counts them: total includes the
    LoRA parameters and both the original and the copy of each modules_to_save module."""
    state = require_state(gm)
    trainable = sum(p.numel() for p in lora_parameters(gm))
    total = sum(p.numel() for p in gm.parameters())
    # the originals that modules_to_save copies replaced still exist in the base model
    total += sum(p.numel() for n in state.saved for p in gm.get_submodule(n).parameters())
    return trainable, total


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
    graph = _copy_graph(gm.graph)
    new = fx.GraphModule(gm, graph)
    new.meta[CAPTURE_KEY] = gm.meta.get(CAPTURE_KEY, "export")
    if PROGRAM_KEY in gm.meta:  # export_onnx(new) then reuses the capture's graph
        new.meta[PROGRAM_KEY] = weightless(gm.meta[PROGRAM_KEY])
    if state is not None:
        for name in state.saved:  # modules_to_save copies are part of the merged model
            set_attr_cow(new, name, gm.get_submodule(name))
        rest = _fold_in_place(gm, new, state) if inplace else branches(gm)
        run_pass("merge", merge_pass, new, {n: state.sites[n] for n in rest}, rest)
        new.delete_all_unused_submodules()
    new.train(gm.training)
    return new


def _fold_in_place(gm: fx.GraphModule, new: fx.GraphModule,
                   state: LoraState) -> dict[str, LoraBranch]:
    """W ← W + ΔW (fp32, cast once) in W's storage for each site whose weight no other op
    reads; returns the branches left to fold by copy. ``gm`` then refuses to run."""
    from .passes.merge import site_uses
    from .patterns import weight_readers

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


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    new._codegen = copy.deepcopy(graph._codegen)
    val_map: dict[fx.Node, fx.Node] = {}
    out = new.graph_copy(graph, val_map, return_output_node=True)
    assert isinstance(out, tuple)
    new.output(out[0], type_expr=getattr(graph.output_node(), "type", None))
    return new


def to_adapter(gm: nn.Module) -> Adapter:
    """The adapter held by an injected GraphModule (A, B per site; modules_to_save tensors).

    Its config is what PEFT reads: ``all-linear`` / ``target_forms`` become the explicit site
    list, and a fused site is its exact plain equivalent (rank k·r, alpha keeping s); lorafx's
    own config then rides along in ``Adapter.lorafx`` (``lorafx_config.json``).
    """
    state = require_state(gm)
    brs = branches(gm)
    lora = {name: b.peft_factors() for name, b in brs.items()}
    kinds = {name: b.kind for name, b in brs.items() if b.kind == "embedding"}
    saved = {f"{name}.{pname}": p.detach() for name in state.saved
             for pname, p in gm.get_submodule(name).named_parameters()}
    config, lorafx = _peft_view(state.config, list(state.sites), brs)
    return Adapter(config, lora, saved, kinds, lorafx, magnitude=magnitudes(gm))


def _peft_view(config: LoraConfig, sites: list[str], brs: dict[str, LoraBranch]
               ) -> tuple[LoraConfig, dict[str, Any] | None]:
    """(config PEFT can load, lorafx's config when PEFT's view loses something, else None)."""
    changes: dict[str, Any] = {}
    if config.target_modules == "all-linear" or config.target_forms:
        changes.update(target_modules=sorted(sites), target_forms=None)
    fused = {n: b for n, b in brs.items() if isinstance(b, LoraFused)}
    if fused:  # keys sort first in the JSON and match one site only: PEFT takes the first match
        keys = {n: f"(?:^{re.escape(n)})" for n in fused}
        ranks = {keys[n]: b.k * b.r for n, b in fused.items()}
        alphas = {keys[n]: b.scaling * (math.sqrt(ranks[keys[n]]) if config.use_rslora
                                        else ranks[keys[n]]) for n, b in fused.items()}
        changes.update(rank_pattern={**ranks, **config.rank_pattern},
                       alpha_pattern={**alphas, **config.alpha_pattern}, enable_lora={})
    view = dataclasses.replace(config, **changes) if changes else config
    return view, (dataclasses.asdict(config) if fused else None)


def save_adapter(gm: nn.Module, directory: str | Path, force: bool = False) -> Path:
    """Write PEFT's adapter layout (adapter_config.json + adapter_model.safetensors)."""
    adapter = to_adapter(gm)
    layouts = {rec.layout for rec in require_state(gm).sites.values()}
    extra = {"fan_in_fan_out": layouts == {"in_out"}}
    return write_adapter(adapter, directory, force=force, extra_config=extra)


def load_adapter(model: nn.Module, example_inputs: tuple[Any, ...], directory: str | Path,
                 dynamic_shapes: Any = None) -> fx.GraphModule:
    """Inject the adapter in ``directory`` (written by lorafx or PEFT) into ``model``."""
    adapter = read_adapter(directory)
    return apply_adapter(model, example_inputs, adapter, dynamic_shapes, where=str(directory))


def apply_adapter(model: nn.Module, example_inputs: tuple[Any, ...], adapter: Adapter,
                  dynamic_shapes: Any = None, where: str = "adapter") -> fx.GraphModule:
    """Inject ``adapter.config`` and copy its weights in, checking every site and shape."""
    config = LoraConfig.from_peft_dict(adapter.lorafx) if adapter.lorafx else \
        copy.copy(adapter.config)
    if not reads_weight(config.init_lora_weights):  # PiSSA/OLoRA recompute W_res, as PEFT
        config.init_lora_weights = False
    try:
        gm = inject(model, example_inputs, config, dynamic_shapes)
    except LoraFxError as err:
        if "matches no site" not in str(err):
            raise
        first = sorted(adapter.lora)[0] if adapter.lora else "?"
        raise LoraFxError(f"{where}: site {first!r} of the adapter is not in this model: the "
                          f"adapter belongs to another model ({err})") from err
    state = require_state(gm)
    have, want = set(state.sites), set(adapter.lora)
    if want - have:
        raise LoraFxError(f"{where}: site {sorted(want - have)[0]!r} of the adapter is not in "
                          "this model: the adapter belongs to another model")
    if have - want:
        raise LoraFxError(f"{where}: site {sorted(have - want)[0]!r} has no weights in the "
                          "adapter: the adapter is incomplete or for another model")
    with torch.no_grad():
        for name, branch in branches(gm).items():
            branch.load_factors(*adapter.lora[name], where=f"{where}: {name}")
        load_magnitudes(gm, adapter.magnitude, where)  # DoRA's m (none for plain LoRA)
        for key, t in adapter.saved.items():
            try:
                target = gm.get_parameter(key)
            except AttributeError as err:
                raise LoraFxError(f"{where}: saved module tensor {key!r} is not in this model"
                                  ) from err
            _copy_checked(target, t, f"{where}: {key}")
    return gm


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.shape != src.shape:
        raise LoraFxError(f"{what} has shape {tuple(src.shape)} but the model needs "
                          f"{tuple(dst.shape)}: the adapter belongs to another model")
    if dst.is_meta:
        return
    dst.copy_(src.to(dst.dtype))
