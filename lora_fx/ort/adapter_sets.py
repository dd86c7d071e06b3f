"""Adapter sets of mixed-batch models: stacked factors, set files, each row's adapter id.

A mixed-batch model (``lorafx export --mixed-batch``) reads, per site,
``<site>.lora_A.weight`` [n+1, in, r_max] and ``<site>.lora_B.weight`` [n+1, r_max, out]:

    A[k] = A_kᵀ,  B[k] = s_k·B_kᵀ  (k = 1..n, zero-padded to r_max),  A[0] = B[0] = 0

and an input ``adapter_ids`` (int64 [batch]) choosing k per row (0: the base model). The stacks
are overridable initializers, so a set file written here (``lorafx convert-adapter A1 A2 ...
--mixed-batch``) replaces them per run through ``RunOptions.add_active_adapter``. The order of
a set (and of the model's exported set) is a JSON file beside it mapping names to ids,
``model.adapter_ids.json`` for ``model.onnx``: ``{"__base__": 0, "a1": 1, "a2": 2}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapter.peft import read_adapter
from ..errors import LoraFxError
from ..fileio import atomic_path
from ..onnx.names import A_SUFFIX, B_SUFFIX
from .adapters import check_names as check_sites
from .adapters import model_slots, onnx_params, write_ort_adapter

BASE = "__base__"            # the name of id 0 (PEFT's name for "no adapter" in adapter_names)
IDS_INPUT = "adapter_ids"    # the graph input: int64 [batch]
IDS_SUFFIX = ".adapter_ids.json"
NAMES_META = "lorafx.mixed_adapters"  # model metadata_props key: JSON list, names[k] = id k


def check_names(names: Sequence[str]) -> list[str]:
    """``["__base__", *names]`` after refusing empty, duplicate or reserved names."""
    seen: set[str] = set()
    for name in names:
        if not name or name == BASE or name in seen or "," in name or name.isdigit():
            why = "is reserved for the base model" if name == BASE else (
                "appears twice" if name in seen else "is empty, a number or holds a comma")
            raise LoraFxError(f"adapter name {name!r} {why}: give each adapter its own name "
                              "(--adapter NAME=DIR)")
        seen.add(name)
    return [BASE, *names]


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


def ids_file(path: str | Path) -> Path:
    """Where the set order of ``path`` lives: ``m.onnx`` → ``m.adapter_ids.json``."""
    p = Path(path)
    return p.with_name(p.stem + IDS_SUFFIX)


def write_ids(path: str | Path, names: Sequence[str]) -> Path:
    """Write ``{name: id}`` (``names[k]`` has id k) beside ``path``, atomically."""
    target = ids_file(path)
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps({name: k for k, name in enumerate(names)}, indent=1) + "\n")
    return target


def read_ids(path: str | Path) -> list[str] | None:
    """The names by id recorded beside ``path`` (None when there is no such file)."""
    target = ids_file(path)
    if not target.is_file():
        return None
    try:
        data = json.loads(target.read_text())
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise LoraFxError(f"{target} is not a JSON object mapping adapter names to ids: "
                          "rewrite it or delete it")
    names = sorted(data, key=lambda name: data[name] if isinstance(data[name], int) else -1)
    ok = [data[n] for n in names] == list(range(len(names)))
    if not ok or not names or names[0] != BASE:
        raise LoraFxError(f"{target} must map {BASE!r} to 0 and the adapters to 1, 2, ... "
                          "without gaps: rewrite it or delete it")
    return names


def stack_factors(per_adapter: Sequence[Mapping[str, torch.Tensor]],
                  shapes: Mapping[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """``{<site>.lora_A.weight: [n+1, in, r_max], <site>.lora_B.weight: [n+1, r_max, out]}``
    from each adapter's ``{<site>.lora_A.weight: A' (in, r), ...lora_B.weight: B' (r, out)}``
    (``onnx_params``: scale already in B'); row 0 and absent sites zero, ranks zero-padded."""
    out: dict[str, torch.Tensor] = {}
    n = len(per_adapter)
    for site, (d_in, d_out) in sorted(shapes.items()):
        pairs = [(p[site + A_SUFFIX], p[site + B_SUFFIX]) for p in per_adapter
                 if site + A_SUFFIX in p]
        r_max = max((int(a.shape[1]) for a, _ in pairs), default=1)
        dtype = pairs[0][0].dtype if pairs else torch.float32
        a_stack = torch.zeros(n + 1, d_in, r_max, dtype=dtype)
        b_stack = torch.zeros(n + 1, r_max, d_out, dtype=dtype)
        for k, params in enumerate(per_adapter, start=1):
            if site + A_SUFFIX in params:
                a, b = params[site + A_SUFFIX], params[site + B_SUFFIX]
                a_stack[k, :, : a.shape[1]] = a
                b_stack[k, : b.shape[0], :] = b
        out[site + A_SUFFIX], out[site + B_SUFFIX] = a_stack, b_stack
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
