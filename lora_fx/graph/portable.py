"""A GraphModule that follows ``.to()``, ``.cuda()``, ``.half()`` like the eager model it came from.

torch.export bakes what it saw into the graph: the device of every tensor it creates
(``arange(..., device=cpu)``, ``zeros``, ``_assert_tensor_metadata``, ``aten.to.device``) and
the dtype of every cast and metadata check. Moving the parameters alone then fails in forward.
:class:`PortableGraphModule` overrides ``nn.Module._apply`` (which ``to``, ``cuda``, ``half``,
``bfloat16``, ``float``, ``to_empty`` all call) so that after the tensors move:

- devices: every ``torch.device`` in the graph's arguments, the fake values in ``node.meta``
  and the tensor constants (attributes that are neither parameters nor buffers) move as
  ``fn`` moves a tensor of that device (a probe ``fn(empty(0, device=d))`` gives the map d → d');
- dtypes: a baked graph cannot tell a deliberate ``to(float32)`` (RMSNorm's upcast) from a
  ``to(input_dtype)`` that was fp32 at capture, so when a floating tensor of the captured
  graph changed dtype, the graph is rebuilt by ``meta[REBUILD_KEY](gm)`` (the capture
  redone from the eager model over the module's own tensors, branches re-attached; see
  ``capture.recapture``) and transplanted into the module in place.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..errors import LoraFxError
from .attrs import set_attr_cow

REBUILD_KEY = "lorafx_rebuild"  # meta: (gm) -> a GraphModule over gm's tensors, new dtypes
INPUTS_KEY = "lorafx_inputs"    # meta: example inputs a rebuild captures with (follow _apply)
DTYPES_KEY = "lorafx_dtypes"    # meta: {tensor path: dtype} of the floating tensors captured
PROGRAM_KEY = "lorafx_program"  # meta: the kept ExportedProgram (capture.program)
Fn = Callable[[torch.Tensor], torch.Tensor]


def float_dtypes(module: nn.Module) -> dict[str, torch.dtype]:
    """Path → dtype of every floating parameter and buffer of ``module``."""
    named = [*module.named_parameters(remove_duplicate=False),
             *module.named_buffers(remove_duplicate=False)]
    return {name: t.dtype for name, t in named if t.is_floating_point()}


def device_map(graph: fx.Graph, fn: Fn) -> dict[torch.device, torch.device]:
    """d → the device ``fn`` moves a tensor on d to, for every device the graph names."""
    seen: set[torch.device] = set()

    def visit(a: Any) -> Any:
        if isinstance(a, torch.device):
            seen.add(a)
        return a

    for node in graph.nodes:
        fx.node.map_aggregate((node.args, node.kwargs), visit)
    out = {d: _probe(fn, d) for d in seen}
    return {d: new for d, new in out.items() if new is not None and new != d}


def _probe(fn: Fn, device: torch.device) -> torch.device | None:
    """Where ``fn`` moves a floating tensor on ``device`` (None when it cannot say)."""
    try:
        return fn(torch.empty(0, device=device)).device
    except (RuntimeError, TypeError, AssertionError):  # a device this machine lacks
        return None


def retarget_devices(graph: fx.Graph, moves: dict[torch.device, torch.device]) -> int:
    """Replace each baked device d by ``moves[d]`` in args, kwargs and fake values; count."""
    count = 0

    def swap(a: Any) -> Any:
        nonlocal count
        if isinstance(a, torch.device) and a in moves:
            count += 1
            return moves[a]
        return a

    for node in graph.nodes:
        node.args = fx.node.map_aggregate(node.args, swap)
        node.kwargs = fx.node.map_aggregate(node.kwargs, swap)  # type: ignore[assignment]
        if "val" in node.meta:
            node.meta["val"] = fx.node.map_aggregate(
                node.meta["val"], lambda v: _moved_fake(v, moves))
    return count


def _moved_fake(v: Any, moves: dict[torch.device, torch.device]) -> Any:
    if isinstance(v, torch.Tensor) and v.device in moves:
        try:
            return v.to(moves[v.device])
        except RuntimeError:  # a fake tensor whose mode is gone: the stale value stays
            return v
    return v


def constants(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Tensors that ``get_attr`` nodes read but that are neither parameters nor buffers."""
    held = {id(t) for t in [*gm.parameters(), *gm.buffers()]}
    out = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                value = _resolve(gm, str(node.target))
            except AttributeError:
                continue
            if isinstance(value, torch.Tensor) and id(value) not in held:
                out[str(node.target)] = value
    return out


def _resolve(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def transplant(dst: fx.GraphModule, fresh: fx.GraphModule) -> None:
    """Give ``dst`` the graph of ``fresh`` in place: every attribute or module ``fresh``'s graph
    reads that ``dst`` lacks (or holds as another object) is set into ``dst`` first.

    Refuses when a parameter of ``dst`` would no longer be read: the rebuilt graph does not
    compute what ``dst`` computed (e.g. a merge that untied a shared weight).
    """
    for node in fresh.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            new = _resolve(fresh, str(node.target))
            try:
                same = _resolve(dst, str(node.target)) is new
            except AttributeError:
                same = False
            if not same:
                set_attr_cow(dst, str(node.target), new)
    read = {id(t) for t in fresh.parameters()}
    lost = [n for n, p in dst.named_parameters() if id(p) not in read]
    if lost:
        raise LoraFxError(f"cannot rebuild the graph for its new dtype: parameter {lost[0]!r} "
                          "is no longer read; cast the model before injecting or merging")
    dst.graph = fresh.graph
    dst.recompile()
    for key in (PROGRAM_KEY,):
        if key in fresh.meta:
            dst.meta[key] = fresh.meta[key]
        else:
            dst.meta.pop(key, None)


class PortableGraphModule(fx.GraphModule):
    """A GraphModule whose baked devices and dtypes follow ``_apply`` (see the module doc)."""

    def _apply(self, fn: Fn, recurse: bool = True) -> PortableGraphModule:  # type: ignore[override]
        moves = device_map(self.graph, fn)
        kept = constants(self)
        super()._apply(fn, recurse)
        if not recurse:
            return self
        for path, value in kept.items():  # constants: a cast is undone by the rebuild below
            new = fn(value)
            if new is not value:
                set_attr_cow(self, path, new)
        if INPUTS_KEY in self.meta:  # the example inputs a rebuild captures with follow too
            self.meta[INPUTS_KEY] = pytree.tree_map_only(torch.Tensor, fn,
                                                         self.meta[INPUTS_KEY])
        if moves and retarget_devices(self.graph, moves):
            self.recompile()
            _retarget_program(self, moves, fn)
        self._rebuild_if_cast()
        return self

    def _rebuild_if_cast(self) -> None:
        captured = self.meta.get(DTYPES_KEY)
        if not captured:
            return
        now = float_dtypes(self)
        if all(now.get(k, v) == v for k, v in captured.items()):
            return
        rebuild = self.meta.get(REBUILD_KEY)
        if rebuild is None:
            raise LoraFxError("this captured graph cannot change dtype: it keeps no eager model "
                              "to capture again; cast the model before capturing it")
        transplant(self, rebuild(self))
        self.meta[DTYPES_KEY] = {k: now[k] for k in captured if k in now}
        self.train(self.training)  # new dropout modules take the module's mode


def _retarget_program(gm: fx.GraphModule, moves: dict[torch.device, torch.device], fn: Fn
                      ) -> None:
    """The kept program follows too: a copy of its graph (merged copies share the original)
    with its devices retargeted and its constants moved; its weights are the module's own
    when export reuses it (``capture.program.captured_program``)."""
    program = gm.meta.get(PROGRAM_KEY)
    if program is None:
        return
    root = copy.deepcopy(program.graph_module)
    retarget_devices(root.graph, moves)
    root.recompile()
    moved = {k: fn(v) if isinstance(v, torch.Tensor) else v
             for k, v in program.constants.items()}
    try:
        gm.meta[PROGRAM_KEY] = torch.export.ExportedProgram(
            root=root, graph=root.graph, graph_signature=program.graph_signature,
            state_dict=program.state_dict, range_constraints=program.range_constraints,
            module_call_graph=program.module_call_graph, example_inputs=None,
            constants=moved, verifiers=[program.verifier])
    except Exception:  # noqa: BLE001 - an optimization: without it, export traces again
        gm.meta.pop(PROGRAM_KEY, None)


def graph_module(root: nn.Module, graph: fx.Graph, class_name: str = "GraphModule"
                 ) -> fx.GraphModule:
    """``fx.GraphModule(root, graph)`` as a :class:`PortableGraphModule` when ``root`` is one."""
    cls = PortableGraphModule if isinstance(root, PortableGraphModule) else fx.GraphModule
    return cls(root, graph, class_name)
