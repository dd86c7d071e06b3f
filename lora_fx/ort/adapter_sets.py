"""Adapter sets of mixed-batch models: set files and each row's adapter id.

A mixed-batch model (``lorafx export --mixed-batch``) reads per site the stacks
``<site>.lora_A.weight`` [n+1, in, r_max] and ``<site>.lora_B.weight`` [n+1, r_max, out] (row
0 zero: the base model) and an input ``adapter_ids`` (int64 [batch]) choosing k per row; the
layout and the ids file beside the model are :mod:`lora_fx.deploy_format`'s. The stacks are
overridable initializers, so a set file written here (``lorafx convert-adapter A1 A2 ...
--mixed-batch``) replaces them per run through ``RunOptions.add_active_adapter``, and its order
is written beside it (``set.adapter_ids.json``: ``{"__base__": 0, "a1": 1, "a2": 2}``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapter.peft import read_adapter
from ..deploy_format import (
    A_SUFFIX,
    B_SUFFIX,
    IDS_INPUT,
    check_names,
    stack_factors,
    write_ids,
)
from ..errors import LoraFxError
from .adapters import check_names as check_sites
from .adapters import model_slots, onnx_params, write_ort_adapter


def named_dirs(specs: Sequence[str]) -> dict[str, str]:
    """``NAME=DIR`` items → {NAME: DIR}; a plain ``DIR`` is named by its folder name (an
    existing path containing ``=`` stays a path). Names are checked (``check_names``)."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not (sep and name and not Path(spec).exists()):
            name, directory = Path(spec).name, spec
        check_names([*out, name])
        out[name] = directory
    return out


def site_shapes(per_adapter: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, tuple[int, int]]:
    """site → (in, out) over every adapter's sites; adapters disagreeing are refused."""
    shapes: dict[str, tuple[int, int]] = {}
    for params in per_adapter:
        for key, a in params.items():
            if key.endswith(A_SUFFIX):
                site = key[: -len(A_SUFFIX)]
                dims = (int(a.shape[0]), int(params[site + B_SUFFIX].shape[1]))
                if shapes.setdefault(site, dims) != dims:
                    raise LoraFxError(f"site {site!r} is {shapes[site][0]}->{shapes[site][1]} "
                                      f"in one adapter and {dims[0]}->{dims[1]} in another: "
                                      "the adapters belong to different base models")
    return shapes


@dataclass
class SetReport:
    path: Path
    ids_path: Path
    names: list[str]                         # names[k] has id k
    sites: dict[str, int]                    # site → r_max
    dtype: str
    filled: list[str] = field(default_factory=list)   # model sites no adapter of the set targets
    bytes: int = 0


def convert_set(adapters: Mapping[str, str | Path] | Sequence[str | Path], output: str | Path,
                model: str | Path | None = None, dtype: str | None = None,
                force: bool = False) -> SetReport:
    """Stack adapter dirs (id k = k-th; named by their folder names unless a mapping is given)
    into one ``.onnx_adapter`` for a mixed-batch model, and write the set's order beside it.

    With ``model`` (a mixed-batch .onnx) names and dims are checked, the dtype is the model's,
    and model sites no adapter targets get zeros (else the exported set's factors would run).
    """
    items = list(adapters.items()) if isinstance(adapters, Mapping) else \
        [(Path(d).name, d) for d in adapters]
    names = check_names([name for name, _ in items])
    if not items:
        raise LoraFxError("an adapter set needs at least one adapter directory")
    slots = model_slots(model) if model is not None else {}
    found = {s.dtype for s in slots.values()}
    model_dtype = found.pop() if len(found) == 1 else None
    if dtype is not None and model_dtype is not None and dtype != model_dtype:
        raise LoraFxError(f"--dtype {dtype} disagrees with {model}, whose adapter inputs are "
                          f"{model_dtype}: drop --dtype")
    dtype = dtype or model_dtype or "fp32"
    params = [onnx_params(read_adapter(d), dtype, str(d)) for _, d in items]
    shapes = site_shapes(params)
    for p, (_, d) in zip(params, items, strict=True):
        if slots:  # names and dims against the model; fills a copy, which is dropped
            check_sites(dict(p), slots, str(model), str(d), fill_missing=True)
    filled = sorted(set(slots) - set(shapes))
    for site in filled:
        d_in, d_out = slots[site].in_features, slots[site].out_features
        if d_in is None or d_out is None:
            raise LoraFxError(f"{model}: site {site!r} has symbolic in/out dims: cannot fill")
        shapes[site] = (d_in, d_out)
    path = write_ort_adapter(stack_factors(params, shapes), output, force=force)
    ids = write_ids(path, names)
    ranks = {site: max((int(p[site + A_SUFFIX].shape[1]) for p in params
                        if site + A_SUFFIX in p), default=1) for site in shapes}
    return SetReport(path, ids, names, ranks, dtype, filled, path.stat().st_size)


def row_ids(rows: Sequence[str | int], names: Sequence[str] | None, count: int,
            batch: int | None, where: str = "adapter rows") -> np.ndarray:
    """The int64 ``adapter_ids`` of a batch whose row i uses adapter ``rows[i]`` (a name of
    ``names``, or an id in [0, count)); refused, with one line, before ONNX Runtime runs."""
    if batch is not None and len(rows) != batch:
        raise LoraFxError(f"{where}: {len(rows)} adapters given for a batch of {batch} rows: "
                          "give one adapter name or id per row")
    ids = [_row_id(row, names, count, where) for row in rows]
    return np.asarray(ids, dtype=np.int64)


def _row_id(row: str | int | Any, names: Sequence[str] | None, count: int, where: str) -> int:
    if isinstance(row, str) and not row.lstrip("-").isdigit():
        if names is None or row not in names:
            known = ", ".join(names) if names else "none recorded: use ids"
            raise LoraFxError(f"{where}: adapter {row!r} is not in the set (names: {known})")
        return names.index(row)
    try:
        k = int(row)
    except (TypeError, ValueError) as err:
        raise LoraFxError(f"{where}: {row!r} is neither an adapter name nor an id") from err
    if not 0 <= k < count:
        raise LoraFxError(f"{where}: adapter id {k} is outside [0, {count - 1}] (0 = base, "
                          f"{count - 1} adapters in the set)")
    return k


def check_ids(ids: Any, count: int, batch: int | None, where: str = IDS_INPUT) -> np.ndarray:
    """``adapter_ids`` given directly: int64 [batch], every id in [0, count)."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise LoraFxError(f"{where} must be a 1-D integer array (one id per row), got "
                          f"{arr.dtype} of shape {list(arr.shape)}")
    return row_ids([int(k) for k in arr], None, count, batch, where)
