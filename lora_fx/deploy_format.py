"""lorafx's deploy format, one copy of each fact: what ``lora_fx.onnx`` writes and
``lora_fx.ort`` reads (adapter inputs, adapter sets, dtypes, limits, tolerances, GenAI files).
Pure data and helpers: it imports neither side, so that neither side imports the other for them.

Adapter inputs. An unmerged site reads, with PEFT's A (r, in), B (out, r) and the site's
scale s, the overridable initializers (ONNX Runtime's adapter inputs)

    ``<site>.lora_A.weight`` = A' = Aᵀ (in, r),   ``<site>.lora_B.weight`` = B' = s·Bᵀ (r, out)

(the scale folded into B', computed in fp32 and cast once: :func:`onnx_factors`), so that
``Δ(x) = (x A') B' = s·x Aᵀ Bᵀ`` and the output is ``y + Δ(x)``. The model records each site's
``[in, out, r]`` as JSON under the ``metadata_props`` key :data:`RANK_META`.

Mixed batch (an adapter per row). Per site the stacks

    A [n+1, in, r_max],  B [n+1, r_max, out]:  A[k] = A_k',  B[k] = B_k'  (k = 1..n),
    A[0] = B[0] = 0  (row 0: the base model; ranks and absent sites zero-padded)

(:func:`stack_factors`), and an int64 [batch] input :data:`IDS_INPUT` choosing k per row. The
set's order is the JSON file beside the model (:func:`ids_file`: ``m.onnx`` →
``m.adapter_ids.json``), ``{"__base__": 0, "a1": 1, ...}``; the exported set's names by id are
also in ``metadata_props[NAMES_META]``.

Dtypes: "fp32", "fp16", "bf16" (:data:`DTYPES`; ONNX elem types :data:`ONNX_TYPES`). A model
whose initializers pass :data:`EXTERNAL_DATA_BYTES` keeps them in external data. Verification of
a cast export allows ``max |ORT − fp32 PyTorch| <= DTYPE_RTOL[dtype] · max(1, max |y|)``, and
``TF32_RTOL · max(1, max |y|)`` where CUDA keeps TF32 on.

GenAI: a KV-cache export's folder holds :data:`GENAI_CONFIG` (read by :func:`read_genai_config`)
and the tokenizer files of :data:`TOKENIZER_FILES` that the source model had; the search defaults
come from the model's :data:`GENERATION_CONFIG` (keys :data:`GENAI_SEARCH_KEYS`), the chat
template goes to :data:`CHAT_TEMPLATE`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import LoraFxError
from .fileio import atomic_path

# --- adapter inputs -----------------------------------------------------------------------
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
RANK_META = "lorafx.lora_sites"  # model metadata_props key: JSON {site: [in, out, r]}

# --- dtypes, sizes, tolerances ------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ONNX_TYPES = {1: "fp32", 10: "fp16", 16: "bf16"}  # TensorProto elem_type → dtype name
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with room for the graph
# verification of a cast export: max |ORT − fp32 PyTorch| <= rtol · max(1, max |y|)
DTYPE_RTOL = {"fp32": 0.0, "fp16": 1e-2, "bf16": 6e-2}
TF32_RTOL = 5e-3  # ~10 × TF32's unit roundoff 2⁻¹¹: the tolerance when TF32 stays on

# --- mixed batch --------------------------------------------------------------------------
BASE = "__base__"            # the name of id 0 (PEFT's name for "no adapter" in adapter_names)
IDS_INPUT = "adapter_ids"    # the graph input: int64 [batch]
IDS_SUFFIX = ".adapter_ids.json"
NAMES_META = "lorafx.mixed_adapters"  # model metadata_props key: JSON list, names[k] = id k

# --- GenAI folder -------------------------------------------------------------------------
GENAI_CONFIG = "genai_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer.model", "spiece.model", "chat_template.jinja")
GENERATION_CONFIG = "generation_config.json"  # the model's search defaults (transformers)
TOKENIZER_CONFIG = "tokenizer_config.json"    # may hold "chat_template" (a string or named list)
CHAT_TEMPLATE = "chat_template.jinja"         # the chat template file ORT GenAI 0.18 reads
CHAT_TEMPLATE_JSON = "chat_template.json"     # processors' {"chat_template": ...} (older form)
# genai_config.json "search" keys taken from generation_config.json, with GenAI's JSON types
# (its parser refuses unknown keys and a float where it wants an integer)
GENAI_SEARCH_KEYS: dict[str, type] = {
    "do_sample": bool, "early_stopping": bool, "num_beams": int, "num_return_sequences": int,
    "min_length": int, "max_length": int, "top_k": int, "no_repeat_ngram_size": int,
    "temperature": float, "top_p": float, "repetition_penalty": float,
    "length_penalty": float, "diversity_penalty": float}


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of ``dtype`` ("fp32", "fp16", "bf16"); anything else is refused."""
    if dtype not in DTYPES:
        raise LoraFxError(f"dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def onnx_factors(a: torch.Tensor, b: torch.Tensor, scale: float,
                 dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's A (r, in), B (out, r) → (A' = Aᵀ, B' = s·Bᵀ), computed in fp32 and cast once to
    ``dtype`` (default: A's)."""
    a_t = a.float().flatten(1).t().contiguous()
    b_t = (float(scale) * b.float().flatten(1)).t().contiguous()
    target = dtype or a.dtype
    return a_t.to(target), b_t.to(target)


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


def read_genai_config(directory: str | Path) -> dict[str, Any]:
    """``DIR/genai_config.json`` parsed; a folder without one is refused with advice."""
    d = Path(directory)
    path = d / GENAI_CONFIG
    if not d.is_dir():
        raise LoraFxError(f"{d} is not a directory: pass the folder written by `lorafx export "
                          "--kv-cache -o DIR/model.onnx`")
    if not path.is_file():
        raise LoraFxError(f"{d} has no {GENAI_CONFIG}: pass the folder written by `lorafx export "
                          "MODEL --kv-cache -o DIR/model.onnx`")
    try:
        config = json.loads(path.read_text())
        config["model"]["decoder"]["filename"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LoraFxError(f"{path} is not a GenAI decoder config ({type(err).__name__}: {err}): "
                          "export the model again with --kv-cache") from err
    return config  # type: ignore[no-any-return]


def as_torch(values: Sequence[Any]) -> list[torch.Tensor]:
    return [torch.from_numpy(v) if isinstance(v, np.ndarray) else v for v in values]


def max_diff(got: Sequence[Any], want: Sequence[Any]) -> float:
    """max |got − want| over all outputs in fp64 (numpy or torch); the output count and each
    shape must agree."""
    got, want = as_torch(got), as_torch(want)
    if len(got) != len(want):
        raise LoraFxError(f"ONNX Runtime returned {len(got)} outputs, PyTorch {len(want)}")
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        if tuple(g.shape) != tuple(w.shape):
            raise LoraFxError(f"output shape {tuple(g.shape)} from ONNX Runtime differs from "
                              f"PyTorch's {tuple(w.shape)}")
        if g.numel():
            diff = g.detach().cpu().double() - w.detach().cpu().double()
            worst = max(worst, float(diff.abs().max()))
    return worst
