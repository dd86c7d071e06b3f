"""Mixed-adapter batches: one graph in which each batch row chooses its adapter by id.

Adapters k = 1..n with PEFT factors A_k (r_k, in), B_k (out, r_k) and scales s_k are stacked
per site into

    A[k] = A_kᵀ (in, r_max),   B[k] = s_k·B_kᵀ (r_max, out),   A[0] = B[0] = 0 (the base model)

with ranks below r_max zero-padded (x·A_pad's padded columns are 0 and meet B_pad's zero rows,
so they add nothing) and A[k] = B[k] = 0 where adapter k does not target the site. Row i of a
batch with ``adapter_ids[i] = k`` then computes

    y_i = op(x_i) + (x_i A[k]) B[k]

For ONNX each branch is the custom op ``lorafx::mixed_lora_delta(x, ids, A, B)`` over x seen as
[batch, t, in] (the site's input, batch-major: [batch, ..., in] or the [batch·t, in] that
HF's Conv1D flattens it to), translated to Gather(A, ids) → MatMul → Gather(B, ids) → MatMul:
one batched product per row against the row's own factors (the fastest of the forms measured
in ``benchmarks/bench_mixed.py``). The ids reach every branch through a ``RowIds`` holder that
``MixedBatch.forward`` fills from its last argument, so the model's own code is traced as is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from onnxscript import opset18 as op
from torch import nn

from ..adapter.peft import Adapter, read_adapter
from ..config import LoraConfig
from ..deploy_format import A_SUFFIX, B_SUFFIX, BASE, check_names, stack_factors, torch_dtype
from ..errors import LoraFxError
from ..graph.attrs import set_attr_cow
from ..graph.copy import shallow_copy
from ..graph.state import LoraState, get_state, require_state
from ..model.inject import inject
from ..ort.adapters import onnx_params
from .unmerged import FrozenWeight


@torch.library.custom_op("lorafx::mixed_lora_delta", mutates_args=())
def mixed_lora_delta(x: torch.Tensor, ids: torch.Tensor, a: torch.Tensor,
                     b: torch.Tensor) -> torch.Tensor:
    """Δ[i] = (x[i] A[ids[i]]) B[ids[i]]: x [batch, t, in], A [n+1, in, r], B [n+1, r, out]."""
    return torch.bmm(torch.bmm(x, a[ids]), b[ids])


@mixed_lora_delta.register_fake
def _mixed_lora_delta_fake(x: torch.Tensor, ids: torch.Tensor, a: torch.Tensor,
                           b: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], x.shape[1], b.shape[-1])


def _mixed_lora_delta_onnx(x: Any, ids: Any, a: Any, b: Any) -> Any:
    """MatMul(MatMul(x, Gather(A, ids)), Gather(B, ids)): a batched product per row."""
    return op.MatMul(op.MatMul(x, op.Gather(a, ids, axis=0)), op.Gather(b, ids, axis=0))


def translation_table() -> dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export``: the mixed branch → Gather, MatMul."""
    return {torch.ops.lorafx.mixed_lora_delta.default: _mixed_lora_delta_onnx}


class RowIds:
    """The batch's adapter ids, shared by every ``MixedBranch`` of one model during a call."""

    ids: torch.Tensor | None = None


class MixedBranch(nn.Module):
    """Δ(x)_i = (x_i A[ids_i]) B[ids_i] with the stacks at ``lora_A.weight`` [n+1, in, r] and
    ``lora_B.weight`` [n+1, r, out] (scales folded into B), x batch-major."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, rows: RowIds) -> None:
        super().__init__()
        self.lora_A = FrozenWeight(a)
        self.lora_B = FrozenWeight(b)
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.rows.ids
        if ids is None:
            raise LoraFxError("a mixed-batch branch ran without adapter ids: call the model "
                              "through MixedBatch (the ids are its last argument)")
        rows = x.reshape(ids.shape[0], -1, x.shape[-1])
        delta = torch.ops.lorafx.mixed_lora_delta(rows, ids, self.lora_A.weight,
                                                  self.lora_B.weight)
        return delta.reshape(*x.shape[:-1], delta.shape[-1])


class MixedBatch(nn.Module):
    """``model(*inputs)`` with a LoRA adapter per batch row: ``forward(*inputs, adapter_ids)``.

    ``names[k]`` is the adapter of id k (``names[0] == "__base__"``)."""

    def __init__(self, model: nn.Module, rows: RowIds, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.rows = rows
        self.names = names

    def forward(self, *args: Any) -> Any:
        *inputs, ids = args
        self.rows.ids = ids
        try:
            return self.model(*inputs)
        finally:
            self.rows.ids = None


def read_adapters(adapters: Mapping[str, str | Path | Adapter] | Sequence[str | Path]
                  ) -> dict[str, tuple[Adapter, str]]:
    """name → (adapter, where): a mapping as given, a sequence of directories named by their
    folder names; order kept (it is the ids' order)."""
    items = list(adapters.items()) if isinstance(adapters, Mapping) else \
        [(Path(d).name, d) for d in adapters]
    if not items:
        raise LoraFxError("a mixed-batch export needs at least one adapter (--adapter DIR)")
    check_names([name for name, _ in items])
    return {name: (src, name) if isinstance(src, Adapter) else (read_adapter(src), str(src))
            for name, src in items}


def _check_fits(params: Mapping[str, torch.Tensor], state: LoraState, where: str) -> None:
    """Refuse an adapter whose sites or dims are not this model's (another base model)."""
    for key, t in params.items():
        if not key.endswith(A_SUFFIX):
            continue
        site = key[: -len(A_SUFFIX)]
        rec = state.sites.get(site)
        if rec is None:
            raise LoraFxError(f"{where}: site {site!r} is not in this model: the adapter "
                              "belongs to another base model")
        d_in, d_out = int(t.shape[0]), int(params[site + B_SUFFIX].shape[1])
        if (d_in, d_out) != (rec.in_features, rec.out_features):
            raise LoraFxError(f"{where}: site {site!r} is {d_in}->{d_out} but this model's is "
                              f"{rec.in_features}->{rec.out_features}: the adapter belongs to "
                              "another base model")


def mixed_module(model: nn.Module, example_inputs: tuple[Any, ...],
                 adapters: Mapping[str, str | Path | Adapter] | Sequence[str | Path],
                 dynamic_shapes: Any = None, dtype: str = "fp32") -> MixedBatch:
    """``model`` (the base: a module or a capture without LoRA) with a ``MixedBranch`` at every
    site any adapter targets, stacked in the adapters' order (id k = k-th adapter); the stacks
    computed in fp32 and cast once to ``dtype`` (the model's own weights are left as given)."""
    if get_state(model) is not None:
        raise LoraFxError("mixed-batch export takes the base model, not an injected one: pass "
                          "the model and the adapters (--adapter DIR, repeated)")
    found = {str(t.dtype).removeprefix("torch.") for t in model.parameters()
             if t.is_floating_point()} - {str(torch_dtype(dtype)).removeprefix("torch.")}
    if found:
        raise LoraFxError(f"the model's weights are {', '.join(sorted(found))}, not {dtype}: "
                          "pass the fp32 model (dtype='fp16' / --dtype fp16 casts once, after "
                          "the scales are folded in fp32)")
    read = read_adapters(adapters)
    params = [onnx_params(adapter, dtype, where) for adapter, where in read.values()]
    sites = sorted({k[: -len(A_SUFFIX)] for p in params for k in p if k.endswith(A_SUFFIX)})
    if not sites:
        raise LoraFxError("the adapters target no site: nothing to export as a mixed batch")
    config = LoraConfig(r=1, target_modules="|".join(re.escape(s) for s in sites))
    try:
        gm = inject(model, tuple(example_inputs), config, dynamic_shapes)
    except LoraFxError as err:
        if "matches no site" not in str(err):
            raise
        raise LoraFxError(f"no site of the adapters ({sites[0]!r}, ...) is in this model: the "
                          f"adapters belong to another base model ({err})") from err
    state = require_state(gm)
    for p, (_, where) in zip(params, read.values(), strict=True):
        _check_fits(p, state, where)
    stacks = stack_factors(params, {s: (state.sites[s].in_features,
                                        state.sites[s].out_features) for s in sites})
    rows = RowIds()
    new = shallow_copy(gm)
    for site, rec in state.sites.items():
        branch = MixedBranch(stacks[site + A_SUFFIX], stacks[site + B_SUFFIX], rows)
        set_attr_cow(new, rec.branch, branch)
    return MixedBatch(new, rows, [BASE, *read])


def example_ids(batch: int, n: int) -> torch.Tensor:
    """Ids for tracing and verifying: row i uses adapter (i + 1) mod (n + 1)."""
    return (torch.arange(batch) + 1) % (n + 1)
