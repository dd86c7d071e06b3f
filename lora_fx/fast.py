"""Training-speed passes over an injected GraphModule (optional; results are unchanged).

``fuse_branches``: each site's ``y + s·B(A(dropout(x)))`` — a module call per site, a Δ tensor,
a scale and an add over the [N, out] output — becomes two ops on the graph::

    xa  = F.linear(dropout(x), A)                  # [N, r]
    out = addmm(y, xa, Bᵀ, alpha=s)                # y + s · xa Bᵀ, one GEMM, no Δ tensor

so the scale is applied inside the GEMM (and, in backward, to the small [N, r] and [r, out]
gradients instead of the [N, out] one). A and B stay the branch modules' parameters, so the
optimizer, ``save_adapter`` and ``merge`` see exactly what they saw before, and training follows
PEFT's dynamics (the scale is not folded into B's values). ``compiled`` wraps ``torch.compile``.

``training_graph``: a copy of the graph for training, branches fused, the written-out tanh
GELU made one kernel, and wide linears (LM heads) computed in column blocks where that is
measured faster; ``gm`` keeps the captured graph for save, merge and export.

``captured_program``: the ``torch.export`` program that capture kept, with merged weights, so
that the ONNX export of a merged model does not trace it a second time (see below).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .branches import LoraLinear
from .errors import LoraFxError
from .passes.runner import PassResult, run_pass
from .passes.state import NODE_KEY, require_state


def lora_addmm(y: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, scale: float
               ) -> torch.Tensor:
    """y + scale · xa @ bᵀ as one GEMM over the flattened leading axes: ``addmm(alpha=s)``."""
    out = torch.addmm(y.reshape(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]), b.t(),
                      alpha=scale)
    return out.view(y.shape)


def _fuse_site(gm: fx.GraphModule, name: str, delta: fx.Node, add: fx.Node,
               branch: LoraLinear, path: str) -> None:
    graph = gm.graph
    x, y = delta.args[0], add.args[0]
    tag = {"site": name, "role": "delta"}
    new: list[fx.Node] = []
    with graph.inserting_before(add):
        if not isinstance(branch.lora_dropout, nn.Identity):
            x = graph.call_module(f"{path}.lora_dropout", (x,))
            new.append(x)
        a = graph.get_attr(f"{path}.lora_A.weight")
        b = graph.get_attr(f"{path}.lora_B.weight")
        xa = graph.call_function(F.linear, (x, a))
        out = graph.call_function(lora_addmm, (y, xa, b, branch.scaling))
    for node in (*new, a, b, xa):
        node.meta[NODE_KEY] = dict(tag)
    out.meta = dict(add.meta)
    out.meta[NODE_KEY] = {"site": name, "role": "add"}
    add.replace_all_uses_with(out)
    graph.erase_node(add)
    graph.erase_node(delta)


def _plain_branch(gm: fx.GraphModule, add: fx.Node) -> tuple[str, fx.Node, str] | None:
    """(site, delta node, branch path) when ``add`` is ``y + lora.<site>(x)`` of a LoraLinear."""
    tag = add.meta.get(NODE_KEY)
    if not tag or tag.get("role") != "add" or len(add.args) != 2:
        return None
    delta = add.args[1]
    if not (isinstance(delta, fx.Node) and delta.op == "call_module" and len(delta.users) == 1
            and (delta.meta.get(NODE_KEY) or {}).get("role") == "delta"):
        return None
    rec = require_state(gm).sites.get(tag["site"])
    if rec is None or delta.target != rec.branch or \
            type(gm.get_submodule(rec.branch)) is not LoraLinear:
        return None
    return tag["site"], delta, rec.branch


def fuse_branches_pass(gm: fx.GraphModule) -> PassResult:
    """Replace every plain ``call_module`` branch and its add by ``linear`` + ``lora_addmm``."""
    require_state(gm)
    fused = 0
    for add in list(gm.graph.nodes):
        found = _plain_branch(gm, add)
        if found is not None:
            name, delta, path = found
            branch = gm.get_submodule(path)
            assert isinstance(branch, LoraLinear)
            _fuse_site(gm, name, delta, add, branch, path)
            fused += 1
    return PassResult(gm, fused > 0, {"fused": fused})


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
    from .api import _copy_graph
    from .passes.fuse_gelu import fuse_gelu_pass
    from .passes.wide_linear import wide_linear_pass

    if not isinstance(gm, fx.GraphModule):
        raise LoraFxError("training_graph expects the GraphModule returned by lora_fx.inject")
    require_state(gm)
    train = fx.GraphModule(gm, _copy_graph(gm.graph), class_name=type(gm).__name__)
    train.meta = dict(gm.meta)
    train.train(gm.training)
    run_pass("fuse_branches", fuse_branches_pass, train)
    run_pass("fuse_gelu", fuse_gelu_pass, train)
    return run_pass("wide_linear", wide_linear_pass, train).gm


def compiled(gm: nn.Module, fuse: bool = True, **options: Any) -> Any:
    """``torch.compile`` of an injected GraphModule (branches fused first by default).

    Returns the compiled callable; parameters stay those of ``gm`` (train, save and merge
    ``gm`` itself). ``options`` go to ``torch.compile`` (e.g. ``mode="max-autotune"``).
    """
    if fuse:
        fuse_branches(gm)
    return torch.compile(gm, **options)


# --- ONNX export of the program captured at inject time (no second trace) --------------------
#
# A merged GraphModule is the captured base graph with new weight values (the merge pass
# erases exactly the nodes inject added), so the ``torch.export.ExportedProgram`` kept by
# ``capture`` computes it once its state dict holds the merged tensors. Exporting that program
# skips the trace that ``torch.onnx.export(module)`` would run again. Used only when the graph
# is verifiably the captured one: same ops in the same order reading the same weights.

PROGRAM_KEY = "lorafx_program"  # gm.meta[PROGRAM_KEY]: the ExportedProgram capture produced


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
