"""Unmerged ONNX export: each LoRA branch stays in the graph with A and B as adapter inputs.

For a site with weight W and PEFT's A (r, in), B (out, r), scale s:

    y = op(x) + s·B(A(x)) = op(x) + (x Aᵀ)(s Bᵀ) = Add(y, MatMul(MatMul(x, A'), B'))

with ``A' = Aᵀ`` (in, r) named ``<site>.lora_A.weight`` and ``B' = s·Bᵀ`` (r, out) named
``<site>.lora_B.weight`` (the scale folded into B). Both are initializers *and* graph inputs of
the same name (ONNX Runtime's overridable initializers), so ``RunOptions.add_active_adapter``
swaps them per run; the rank axis is symbolic, so an adapter of any rank fits. The exported
adapter's weights are the defaults: the file works standalone.

How: each branch is replaced by a custom op ``lorafx::lora_delta(x, A', B')`` that the dynamo
exporter translates to exactly MatMul → MatMul (the optimizer cannot fold or rename it, and
``aten.matmul`` is never decomposed into reshapes that would pin r). A' and B' are exported as
distinct random placeholders (the optimizer merges equal initializers: B = 0 at every site
would become one tensor), then the ONNX IR is post-processed: initializers renamed from the
branch path to the site name and given the real values, added as inputs, rank axes symbolic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import TorchTensor
from onnxscript import opset18 as op
from torch import nn

from ..branches.base import LoraBranch
from ..deploy_format import A_SUFFIX, B_SUFFIX, RANK_META, onnx_factors
from ..errors import LoraFxError
from ..graph.attrs import set_attr_cow
from ..graph.copy import shallow_copy
from ..graph.state import require_state
from .trace import to_onnx


@torch.library.custom_op("lorafx::lora_delta", mutates_args=())
def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Δ = (x A') B' with A' (in, r), B' (r, out): the deployed branch, scale already in B'."""
    return (x @ a) @ b


@lora_delta.register_fake
def _lora_delta_fake(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (x @ a) @ b


def _lora_delta_onnx(x: Any, a: Any, b: Any) -> Any:
    """The ONNX translation of ``lorafx::lora_delta``: MatMul(MatMul(x, A'), B')."""

    return op.MatMul(op.MatMul(x, a), b)


def translation_table() -> dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export``: the branch op → MatMul, MatMul."""
    return {torch.ops.lorafx.lora_delta.default: _lora_delta_onnx}


class FrozenWeight(nn.Module):
    """A factor at ``.weight`` (frozen), so that a branch's factors export as
    ``<branch>.lora_A.weight`` / ``<branch>.lora_B.weight``, the names PEFT's keys end with."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(value, requires_grad=False)


class OnnxBranch(nn.Module):
    """Δ(x) = (x A') B', A' = Aᵀ (in, r), B' = s·Bᵀ (r, out), both computed in fp32 and cast
    once. Parameters live at ``lora_A.weight`` / ``lora_B.weight`` so that their
    exported names are ``<branch path>.lora_A.weight``."""

    def __init__(self, a_t: torch.Tensor, b_t: torch.Tensor) -> None:
        super().__init__()
        self.lora_A = FrozenWeight(a_t)
        self.lora_B = FrozenWeight(b_t)

    @classmethod
    def from_branch(cls, branch: LoraBranch, site: str,
                    dtype: torch.dtype | None = None) -> OnnxBranch:
        """From a linear branch's PEFT factors (a fused branch's are its equivalent plain
        LoRA): A' = Aᵀ, B' = s·Bᵀ in fp32, cast once to ``dtype`` (default: A's)."""
        refusal = branch.unmerged_refusal(site)
        if refusal is not None:
            raise LoraFxError(refusal)
        a, b = branch.peft_factors()
        return cls(*onnx_factors(a, b, branch.scaling, dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.lorafx.lora_delta(x, self.lora_A.weight, self.lora_B.weight)


def deploy_module(gm: nn.Module, source: nn.Module | None = None,
                  dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of an injected GraphModule whose branches are ``OnnxBranch``es (eval-mode math:
    dropout is the identity), their factors taken from ``source`` (default ``gm``: the same
    sites) and cast once to ``dtype`` (default: each site's weight's, so that fp32 factors on
    a bf16 base export as bf16 inputs). ``gm`` and the user's model are not modified."""
    state = require_state(gm)
    new = shallow_copy(gm)
    for name, rec in state.sites.items():
        branch = (source or gm).get_submodule(rec.branch)
        if not isinstance(branch, LoraBranch):
            raise LoraFxError(f"site {name!r}: {rec.branch} is not a LoRA branch")
        target = dtype or new.get_parameter(rec.weight).dtype
        set_attr_cow(new, rec.branch, OnnxBranch.from_branch(branch, name, target))
    return new


@dataclass(frozen=True)
class LoraInput:
    """One site's pair of adapter inputs in an unmerged ONNX model."""

    site: str
    in_features: int
    out_features: int
    rank: int           # the exported (default) adapter's rank


def branch_paths(gm: nn.Module) -> dict[str, str]:
    """site → branch module path, for ``expose_lora_inputs``."""
    return {name: rec.branch for name, rec in require_state(gm).sites.items()}


def expose_lora_inputs(model: Any, branches: dict[str, str],
                       values: dict[str, torch.Tensor]) -> list[LoraInput]:
    """Post-process the exported ``onnx_ir.Model``: for each site rename its branch
    initializers to ``<site>.lora_A.weight`` / ``<site>.lora_B.weight``, give them ``values``
    (by branch parameter path), add them as graph inputs with a symbolic rank axis, and check
    the branch is MatMul(x, A') → MatMul(·, B') → Add."""

    graph = model.graph
    taken = {v.name for v in graph.inputs} | set(graph.initializers)
    found: list[LoraInput] = []
    for site, path in branches.items():
        a = rename_initializer(graph, f"{path}{A_SUFFIX}", f"{site}{A_SUFFIX}", taken)
        b = rename_initializer(graph, f"{path}{B_SUFFIX}", f"{site}{B_SUFFIX}", taken)
        for value, key in ((a, path + A_SUFFIX), (b, path + B_SUFFIX)):
            value.const_value = TorchTensor(values[key].detach().contiguous(), name=value.name)
        hidden = _check_branch(site, a, b)
        (d_in, rank), (_, d_out) = a.shape.numpy(), b.shape.numpy()
        r_dim = _symbolic(f"{site}.lora_r")
        a.shape = _shape([d_in, r_dim])
        b.shape = _shape([r_dim, d_out])
        hidden.shape = None  # its last axis is r: let ONNX Runtime infer it
        graph.inputs.extend([a, b])
        found.append(LoraInput(site, int(d_in), int(d_out), int(rank)))
    model.metadata_props[RANK_META] = json.dumps(
        {f.site: [f.in_features, f.out_features, f.rank] for f in found}, sort_keys=True)
    return found


def _symbolic(name: str) -> Any:

    return ir.SymbolicDim(name)


def _shape(dims: list[Any]) -> Any:

    return ir.Shape(dims)


def rename_initializer(graph: Any, old: str, new: str, taken: set[str]) -> Any:
    value = graph.initializers.get(old)
    if value is None:
        raise LoraFxError(f"internal error: the ONNX exporter dropped or renamed initializer "
                          f"{old!r}; please report it with the model")
    if new in taken:
        raise LoraFxError(f"cannot name the adapter input {new!r}: the model already has a "
                          "value of that name; rename that parameter of the model")
    graph.initializers.pop(old)
    value.name = new
    graph.register_initializer(value)
    taken.add(new)
    return value


def _check_branch(site: str, a: Any, b: Any) -> Any:
    """The MatMul(x, A') output, after checking A' → MatMul → MatMul(·, B') → Add."""
    users = [u.node for u in a.uses()]
    bad = f"internal error: the branch of site {site!r} is not MatMul → MatMul → Add in ONNX"
    if len(users) != 1 or users[0].op_type != "MatMul" or users[0].inputs[1] is not a:
        raise LoraFxError(f"{bad} (lora_A is read by {[n.op_type for n in users]})")
    hidden = users[0].outputs[0]
    second = [u.node for u in hidden.uses()]
    if len(second) != 1 or second[0].op_type != "MatMul" or second[0].inputs[1] is not b:
        raise LoraFxError(f"{bad} (x·A is read by {[n.op_type for n in second]})")
    adds = [u.node.op_type for u in second[0].outputs[0].uses()]
    if adds != ["Add"]:
        raise LoraFxError(f"{bad} (the delta is read by {adds})")
    return hidden


def with_placeholders(module: nn.Module, keys: list[str]) -> nn.Module:
    """A copy of ``module`` whose parameters ``keys`` are distinct random tensors of the same
    shapes and dtypes: the exporter's optimizer merges equal initializers (B = 0 at every
    site would become one tensor), so factors are traced as placeholders and given their
    values in the ONNX IR afterwards."""
    copy = shallow_copy(module)
    gen = torch.Generator().manual_seed(0)
    for key in keys:
        real = module.get_parameter(key)
        fake = torch.randn(real.shape, generator=gen).to(real.dtype)
        set_attr_cow(copy, key, nn.Parameter(fake, requires_grad=False))
    return copy


def export_unmerged(module: nn.Module, args: tuple[Any, ...], dynamic_shapes: Any,
                    opset: int | None) -> tuple[Any, dict[str, dict[str, int]]]:
    """Export ``module`` (a ``deploy_module``, possibly cast) and expose its adapter inputs;
    returns the ONNXProgram and ``{site: {"in", "out", "r"}}``."""

    paths = branch_paths(module)
    values: dict[str, torch.Tensor] = {key: module.get_parameter(key) for path in paths.values()
              for key in (path + A_SUFFIX, path + B_SUFFIX)}
    program = to_onnx(with_placeholders(module, list(values)), args, dynamic_shapes, opset,
                      translations=translation_table())
    found = expose_lora_inputs(program.model, paths, values)
    return program, {f.site: {"in": f.in_features, "out": f.out_features, "r": f.rank}
                     for f in found}
