"""The ``torch.export`` program kept by capture, reused for ONNX export (no second trace).

A merged GraphModule is the captured base graph with new weight values (the merge pass erases
exactly the nodes inject added), so the ``torch.export.ExportedProgram`` kept by ``capture``
computes it once its state dict holds the merged tensors. Exporting that program skips the
trace that ``torch.onnx.export(module)`` would run again. Used only when the graph is
verifiably the captured one: same ops in the same order reading the same weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from ..graph.portable import PROGRAM_KEY  # gm.meta[PROGRAM_KEY]: the program capture made


def _signature(graph: fx.Graph, names: dict[str, str]) -> list[tuple[str, tuple[str, ...]]]:
    """Each op's target and what each argument is: a weight's path, '·' for a value, or repr.

    ``names``: placeholder name → weight path (a lifted program); get_attr nodes name theirs.
    """
    def arg(a: Any) -> str:
        if isinstance(a, fx.Node):
            if a.op == "get_attr":
                return str(a.target)
            return names.get(a.name, "·") if a.op == "placeholder" else "·"
        if isinstance(a, (list, tuple)):
            return "(" + ",".join(arg(x) for x in a) + ")"
        return repr(a)

    dropout = torch.ops.aten.dropout.default
    return [(str(n.target), tuple(arg(a) for a in n.args))
            for n in graph.nodes if n.op == "call_function" and n.target is not dropout]


def _only_known_modules(gm: fx.GraphModule) -> bool:
    """No call_module but the export guard and capture's dropout modules (identity in eval)."""
    return all(n.op != "call_module" or n.target == "_guards_fn"
               or str(n.target).startswith("lorafx_dropout_") for n in gm.graph.nodes)


def captured_program(module: nn.Module) -> Any | None:
    """The program captured for ``module`` with ``module``'s own weights, if its graph is still
    the captured one.

    ``module``: a capture without branches, or an injected model merged (``lora_fx.merge``
    carries the program over, ``weightless``). None when there is no captured program or the
    graph or its weights differ from the capture's.
    """
    program = getattr(module, "meta", {}).get(PROGRAM_KEY)
    if program is None or not isinstance(module, fx.GraphModule) or \
            not _only_known_modules(module):
        return None
    sig = program.graph_signature
    names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    if _signature(module.graph, {}) != _signature(program.graph, names):
        return None
    state: dict[str, Any] = {}
    params = set(sig.parameters)
    for key, old in program.state_dict.items():
        try:
            new = module.get_parameter(key) if key in params else module.get_buffer(key)
        except AttributeError:
            return None
        if new.shape != old.shape or new.dtype != old.dtype:
            return None
        state[key] = new
    return _with_state(program, state)


def _with_state(program: Any, state: dict[str, Any]) -> Any:
    """``program`` (an ExportedProgram) with ``state`` as its state dict; graph shared."""
    return torch.export.ExportedProgram(
        root=program.graph_module, graph=program.graph, graph_signature=program.graph_signature,
        state_dict=state, range_constraints=program.range_constraints,
        module_call_graph=program.module_call_graph, example_inputs=program.example_inputs,
        constants=program.constants, verifiers=[program.verifier])


def weightless(program: Any) -> Any:
    """``program`` with every weight a meta tensor of the same shape and dtype.

    A merged module carries this instead of the capture's program: ``captured_program`` only
    compares shapes and dtypes and swaps the module's own weights in, so the merged module can
    be exported without a second trace, and the unmerged weights are not kept alive by it.
    """
    def meta(value: torch.Tensor) -> torch.Tensor:
        empty = value.detach().to("meta")
        if isinstance(value, nn.Parameter):
            return nn.Parameter(empty, requires_grad=value.requires_grad)
        return empty

    return _with_state(program, {k: meta(v) for k, v in program.state_dict.items()})

