"""ONNX Runtime adapter files (``.onnx_adapter``) from lorafx or PEFT adapter directories.

Per site, with PEFT's A (r, in), B (out, r) and the site's scale s (``rank_pattern``,
``alpha_pattern`` and rsLoRA honoured through ``LoraConfig.scale_for``):

    ``<site>.lora_A.weight`` = Aᵀ (in, r),   ``<site>.lora_B.weight`` = s·Bᵀ (r, out)

computed in fp32 and cast once: the names and layout of an unmerged export
(``lora_fx.onnx_unmerged``), so ``RunOptions.add_active_adapter`` feeds them to the branch
Add(y, MatMul(MatMul(x, A'), B')) = y + s·B A x. Written with ``onnxruntime.AdapterFormat``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ..adapter.peft import Adapter, read_adapter
from ..deploy_format import A_SUFFIX, B_SUFFIX, ONNX_TYPES, onnx_factors, torch_dtype
from ..errors import LoraFxError
from ..fileio import atomic_path


@dataclass(frozen=True)
class Slot:
    """A site's adapter inputs in an unmerged model: A' (in, r) and B' (r, out)."""

    in_features: int | None
    out_features: int | None
    dtype: str


@dataclass
class ConvertReport:
    path: Path
    sites: dict[str, int]                      # site → rank
    dtype: str
    filled: list[str] = field(default_factory=list)   # model sites given zero (r=1) factors
    bytes: int = 0


def onnx_params(adapter: Adapter, dtype: str = "fp32",
                where: str = "adapter") -> dict[str, torch.Tensor]:
    """``{<site>.lora_A.weight: Aᵀ, <site>.lora_B.weight: s·Bᵀ}`` in fp32, cast once."""
    _refuse_unsupported(adapter, where)
    target = torch_dtype(dtype)
    out: dict[str, torch.Tensor] = {}
    for site, (a, b) in sorted(adapter.lora.items()):
        if a.dim() != 2 or b.dim() != 2:
            raise LoraFxError(f"{where}: site {site!r} has {a.dim()}-D factors (a conv LoRA): "
                              "ONNX Runtime adapters carry linear sites only; export merged")
        out[site + A_SUFFIX], out[site + B_SUFFIX] = onnx_factors(
            a, b, adapter.config.scale_for(site), target)
    return out


def _refuse_unsupported(adapter: Adapter, where: str) -> None:
    kinds = getattr(adapter, "kinds", {}) or {}
    if any(k != "linear" for k in kinds.values()):
        site = sorted(s for s, k in kinds.items() if k != "linear")[0]
        raise LoraFxError(f"{where}: site {site!r} is a {kinds[site]} LoRA: ONNX Runtime "
                          "adapters carry linear sites only; export the model merged")
    if getattr(adapter, "magnitude", None) or adapter.config.use_dora:
        raise LoraFxError(f"{where} is a DoRA adapter, whose scaling is not an additive MatMul "
                          "branch: export the model merged (lorafx export --merge)")
    if adapter.saved:
        raise LoraFxError(f"{where} trains modules_to_save ({sorted(adapter.saved)[0]}), which an "
                          "ONNX Runtime adapter cannot swap: export the model merged")
    stacks = [s for s in sorted(adapter.lora) if adapter.experts(s) > 1]
    if stacks:
        raise LoraFxError(f"{where}: site {stacks[0]!r} is a stack of "
                          f"{adapter.experts(stacks[0])} experts (target_parameters), which ONNX "
                          "Runtime adapters cannot carry yet: export the model merged")


def model_slots(model_path: str | Path) -> dict[str, Slot]:
    """The adapter inputs of an unmerged ONNX model: site → (in, out, dtype)."""

    path = Path(model_path)
    if not path.is_file():
        raise LoraFxError(f"model file {path} does not exist: pass the .onnx written by "
                          "`lorafx export --no-merge`")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # DecodeError, OSError: one line, no traceback
        raise LoraFxError(f"{path} is not a readable ONNX model ({err})") from err
    dims: dict[str, tuple[list[int | None], int]] = {}
    for value in model.graph.input:
        t = value.type.tensor_type
        dims[value.name] = ([d.dim_value if d.HasField("dim_value") else None
                             for d in t.shape.dim], t.elem_type)
    slots: dict[str, Slot] = {}
    for name, (shape, elem) in dims.items():
        if name.endswith(A_SUFFIX) and name[: -len(A_SUFFIX)] + B_SUFFIX in dims:
            site = name[: -len(A_SUFFIX)]
            out_shape = dims[site + B_SUFFIX][0]
            slots[site] = Slot(shape[-2] if len(shape) >= 2 else None,  # [n,] in, r
                               out_shape[-1] if out_shape else None,
                               ONNX_TYPES.get(elem, f"onnx type {elem}"))
    if not slots:
        raise LoraFxError(f"{path} has no LoRA adapter inputs (<site>.lora_A.weight): export it "
                          "with `lorafx export --adapter DIR --no-merge`")
    return slots


def check_names(params: dict[str, torch.Tensor], slots: dict[str, Slot], model: str,
                where: str = "adapter", fill_missing: bool = True) -> list[str]:
    """Check ``params`` against the model's adapter inputs (names, in/out dims, rank
    agreement); give each model site the adapter lacks zero factors of rank 1 (Δ = 0) when
    ``fill_missing``, else refuse. Returns the filled sites."""
    sites = sorted({n[: -len(A_SUFFIX)] for n in params if n.endswith(A_SUFFIX)})
    for site in sites:
        if site not in slots:
            close = difflib.get_close_matches(site, list(slots), 1, 0.6)
            hint = f" (closest: {close[0]!r})" if close else ""
            raise LoraFxError(f"{where}: site {site!r} is not an adapter input of {model}"
                              f"{hint}: the adapter was trained on another model or other "
                              "target_modules; export the model with this adapter's targets")
        a, b = params[site + A_SUFFIX], params[site + B_SUFFIX]
        slot = slots[site]
        if slot.in_features not in (None, a.shape[0]) or \
                slot.out_features not in (None, b.shape[1]):
            raise LoraFxError(f"{where}: site {site!r} is {a.shape[0]}->{b.shape[1]} but "
                              f"{model} has {slot.in_features}->{slot.out_features}: the adapter "
                              "belongs to another model")
    missing = sorted(set(slots) - set(sites))
    if missing and not fill_missing:
        raise LoraFxError(f"{where} has no weights for site {missing[0]!r} of {model} (and "
                          f"{len(missing) - 1} more): convert it with the model to fill zeros")
    for site in missing:
        slot = slots[site]
        if slot.in_features is None or slot.out_features is None:
            raise LoraFxError(f"{model}: site {site!r} has symbolic in/out dims: cannot fill")
        dtype = torch_dtype(slot.dtype)
        params[site + A_SUFFIX] = torch.zeros(slot.in_features, 1, dtype=dtype)
        params[site + B_SUFFIX] = torch.zeros(1, slot.out_features, dtype=dtype)
    return missing


def to_ortvalue(t: torch.Tensor) -> Any:
    """A CPU ``onnxruntime.OrtValue`` holding ``t`` (bf16 through its raw bits)."""

    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        bits = t.view(torch.int16).numpy().view(np.uint16)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, 16)
    return ort.OrtValue.ortvalue_from_numpy(t.numpy())


def write_ort_adapter(params: dict[str, torch.Tensor], path: str | Path, force: bool = False,
                      adapter_version: int = 1, model_version: int = 1) -> Path:
    """Write ``params`` with ``onnxruntime.AdapterFormat``, atomically; refuse to overwrite
    an existing file unless ``force``."""

    path = Path(path)
    if path.exists() and not force:
        raise LoraFxError(f"{path} already exists: pass --force (force=True) to overwrite it")
    values = {name: to_ortvalue(t) for name, t in sorted(params.items())}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(adapter_version)
    fmt.set_model_version(model_version)
    fmt.set_parameters(values)
    with atomic_path(path) as tmp:
        fmt.export_adapter(str(tmp))
    return path


def read_ort_adapter(path: str | Path) -> dict[str, np.ndarray]:
    """The parameters of an ``.onnx_adapter`` file as numpy arrays (fp32/fp16 only)."""

    if not Path(path).is_file():
        raise LoraFxError(f"adapter file {path} does not exist")
    try:
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
        return {name: np.array(v.numpy()) for name, v in params.items()}
    except RuntimeError as err:
        raise LoraFxError(f"{path}: cannot read it as an ONNX Runtime adapter ({err})") from err


def convert_adapter(directory: str | Path, output: str | Path, model: str | Path | None = None,
                    dtype: str | None = None, force: bool = False, fill_missing: bool = True,
                    adapter_version: int = 1, model_version: int = 1) -> ConvertReport:
    """Convert a lorafx or PEFT adapter dir to an ``.onnx_adapter`` file.

    With ``model`` (an unmerged .onnx), names and dims are checked, the dtype is the model's
    (``dtype`` must agree when given), and sites the adapter lacks get zero factors.
    """
    adapter = read_adapter(directory)
    where = str(directory)
    slots = model_slots(model) if model is not None else None
    if slots:
        found = {s.dtype for s in slots.values()}
        model_dtype = found.pop() if len(found) == 1 else "fp32"
        if dtype is not None and dtype != model_dtype:
            raise LoraFxError(f"--dtype {dtype} disagrees with {model}, whose adapter inputs "
                              f"are {model_dtype}: drop --dtype or export the model in {dtype}")
        dtype = model_dtype
    dtype = dtype or "fp32"
    params = onnx_params(adapter, dtype, where)
    ranks = {n[: -len(A_SUFFIX)]: int(t.shape[1]) for n, t in params.items()
             if n.endswith(A_SUFFIX)}
    filled = check_names(params, slots, str(model), where, fill_missing) if slots else []
    path = write_ort_adapter(params, output, force, adapter_version, model_version)
    return ConvertReport(path, ranks, dtype, filled, path.stat().st_size)
