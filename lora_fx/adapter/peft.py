"""PEFT's adapter directory, both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys: ``base_model.model.<site>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r);
conv: A (r, in, *k), B (out, r, 1…); embeddings: ``...lora_embedding_A`` (r, num) and
``...lora_embedding_B`` (dim, r), without ``.weight``, as PEFT saves them;
modules_to_save tensors as ``base_model.model.<module>.<param>``. What PEFT's format cannot say
(fused slices, ``enable_lora``) goes to a lorafx-only ``lorafx_config.json`` beside it, which
PEFT ignores: the PEFT files alone are an exactly equivalent plain LoRA. Loading never unpickles:
safetensors only, and an ``adapter_model.bin`` is refused with advice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..branches.base import delta_from_factors
from ..config import LoraConfig
from ..errors import LoraFxError
from ..fileio import atomic_dir, check_creatable_dir

Factors = tuple[torch.Tensor, torch.Tensor]  # one site's (A, B), PEFT's layouts
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LORAFX_NAME = "lorafx_config.json"  # lorafx only: {"config": lorafx's, "peft_config": PEFT's}
PREFIX = "base_model.model."
MAGNITUDE_KEY = "lora_magnitude_vector"  # DoRA's m [out] (LoraBranch.extra_tensors key)
MAGNITUDE = "." + MAGNITUDE_KEY  # PEFT's key suffix
KEYS = {"linear": (".lora_A.weight", ".lora_B.weight"),
        "embedding": (".lora_embedding_A", ".lora_embedding_B")}


@dataclass
class Adapter:
    """An adapter in memory: its config, and per site the (A, B) pair in PEFT's layout."""

    config: LoraConfig
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    saved: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save tensors
    kinds: dict[str, str] = field(default_factory=dict)  # site → "embedding" (PEFT's keys)
    lorafx: dict[str, Any] | None = None  # lorafx's own config, when PEFT's view differs
    magnitude: dict[str, torch.Tensor] = field(default_factory=dict)  # DoRA: site → m [out]

    def delta(self, site: str) -> torch.Tensor:
        """ΔW = s · B @ A in fp32, shaped like a [out, in] weight."""
        self.refuse_experts(site)
        a, b = self.lora[site]
        return delta_from_factors(a, b, self.config.scale_for(site))

    def refuse_experts(self, site: str) -> None:
        """LoraFxError where ``site`` is an expert stack: it has no single [out, in] delta."""
        experts = self.experts(site)
        if experts > 1:
            raise LoraFxError(f"site {site!r} holds a stack of {experts} experts "
                              "(target_parameters), which has no single [out, in] delta: "
                              "per-expert analysis is not supported yet; analyze an adapter "
                              "without target_parameters")

    def experts(self, site: str) -> int:
        """E where ``site``'s factors stack E experts in PEFT's target_parameters layout
        (A [r·E, in] in expert blocks, B [out, r·E] interleaved), else 1."""
        if not self.config.target_parameters:
            return 1
        a, b = self.lora[site]
        r = self.config.rank_for(site)
        stacked = a.dim() == 2 and a.shape[0] % r == 0 and b.shape[-1] == a.shape[0]
        return int(a.shape[0] // r) if stacked else 1


def to_state(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The safetensors dict PEFT writes for ``adapter``."""
    out: dict[str, torch.Tensor] = {}
    for site, (a, b) in sorted(adapter.lora.items()):
        key_a, key_b = KEYS.get(adapter.kinds.get(site, "linear"), KEYS["linear"])
        out[f"{PREFIX}{site}{key_a}"] = a.detach().contiguous().cpu()
        out[f"{PREFIX}{site}{key_b}"] = b.detach().contiguous().cpu()
    for site, m in sorted(adapter.magnitude.items()):
        out[f"{PREFIX}{site}{MAGNITUDE}"] = m.detach().contiguous().cpu()
    for name, t in sorted(adapter.saved.items()):
        out[f"{PREFIX}{name}"] = t.detach().contiguous().cpu()
    return out


def from_state(config: LoraConfig, state: dict[str, torch.Tensor], where: str) -> Adapter:
    """Split PEFT's flat key space into LoRA pairs and modules_to_save tensors."""
    a_s: dict[str, torch.Tensor] = {}
    b_s: dict[str, torch.Tensor] = {}
    saved: dict[str, torch.Tensor] = {}
    kinds: dict[str, str] = {}
    magnitude: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        name = name.replace(".default.", ".")  # keys saved with the adapter name left in
        for kind, tag, bucket in [(k, tag, d) for k, tags in KEYS.items()
                                  for tag, d in zip(tags, (a_s, b_s), strict=True)]:
            if name.endswith(tag):
                bucket[name[: -len(tag)]] = t
                if kind != "linear":
                    kinds[name[: -len(tag)]] = kind
                break
        else:
            if name.endswith(MAGNITUDE):  # DoRA (lora_fx.variants.dora)
                magnitude[name[: -len(MAGNITUDE)]] = t
            elif ".lora_" in name or name.endswith("lora_magnitude_vector"):
                raise LoraFxError(f"{where}: key {key!r} is a LoRA variant lorafx does not load")
            else:
                saved[name] = t
    if set(a_s) != set(b_s):
        odd = sorted(set(a_s) ^ set(b_s))[0]
        raise LoraFxError(f"{where}: site {odd!r} has only one of lora_A / lora_B: the adapter "
                          "is incomplete, save it again")
    lora = {s: (a_s[s], b_s[s]) for s in sorted(a_s)}
    for site, (a, b) in lora.items():
        if a.shape[0] != b.shape[1]:
            raise LoraFxError(f"{where}: site {site!r} has lora_A {tuple(a.shape)} and lora_B "
                              f"{tuple(b.shape)} whose ranks differ")
    if set(magnitude) - set(lora):
        raise LoraFxError(f"{where}: site {sorted(set(magnitude) - set(lora))[0]!r} has a "
                          "lora_magnitude_vector but no lora_A / lora_B: save the adapter again")
    return Adapter(config, lora, saved, kinds, magnitude=magnitude)


def _lorafx_config(d: Path, peft_config: dict[str, Any]) -> dict[str, Any] | None:
    """The lorafx-only config beside PEFT's, if it still describes this adapter_config.json."""
    path = d / LORAFX_NAME
    if not path.exists():
        return None
    try:
        side = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LoraFxError(f"{path} is not valid JSON ({err}): delete it to load the adapter "
                          "as plain PEFT LoRA") from err
    if not isinstance(side, dict) or side.get("peft_config") != peft_config:
        return None  # adapter_config.json was rewritten (by PEFT?): its plain view rules
    config = side.get("config")
    return config if isinstance(config, dict) else None


def read_adapter(directory: str | Path) -> Adapter:
    """Load an adapter dir written by lorafx or PEFT (safetensors only, never pickle)."""
    d = Path(directory)
    if d.is_file():
        what = "an ONNX Runtime adapter file (for `lorafx run --adapter`)" \
            if d.suffix == ".onnx_adapter" else "a file"
        hint = f"{d.parent}" if d.name in (CONFIG_NAME, WEIGHTS_NAME) else "the directory " \
            f"that holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        raise LoraFxError(f"adapter {d} is {what}, not an adapter directory: pass {hint}")
    if not d.is_dir():
        raise LoraFxError(f"adapter directory {d} does not exist: pass the directory that holds "
                          f"{CONFIG_NAME}")
    cfg_path, weights = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not weights.exists() and (d / "adapter_model.bin").exists():
        raise LoraFxError(f"{d / 'adapter_model.bin'} is a pickle, which lorafx never loads: "
                          "convert it to safetensors (in PEFT: save_pretrained("
                          "safe_serialization=True))")
    if not cfg_path.exists():
        raise LoraFxError(f"{cfg_path} is missing: not an adapter directory; pass a directory "
                          "written by `lorafx inject` or PEFT's save_pretrained")
    if not weights.exists():
        raise LoraFxError(f"{weights} is missing: the adapter directory is incomplete")
    try:
        data = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise LoraFxError(f"{cfg_path} is not valid JSON ({err}): fix or re-save it") from err
    if not isinstance(data, dict):
        raise LoraFxError(f"{cfg_path} must hold a JSON object: fix or re-save it")
    try:
        config = LoraConfig.from_peft_dict(data)
    except LoraFxError as err:
        raise LoraFxError(f"{cfg_path}: {err}") from err
    try:
        state = load_file(str(weights))
    except Exception as err:  # SafetensorError, OSError, ...: never a traceback for a bad file
        raise LoraFxError(f"{weights} is not a readable safetensors file ({err}): re-save "
                          "the adapter") from err
    if not state:
        raise LoraFxError(f"{weights} holds no tensors: the adapter is empty")
    adapter = from_state(config, state, str(d))
    adapter.lorafx = _lorafx_config(d, data)
    return adapter


def is_adapter_config(path: Path) -> bool:
    """Whether ``path`` is a JSON object naming a PEFT type (an adapter's config)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and isinstance(data.get("peft_type"), str)


def check_adapter_output(directory: str | Path, force: bool = False) -> Path:
    """Refuse before any work to write an adapter into ``directory`` when it is a file, holds
    an ``adapter_config.json`` that is not an adapter's, or (without ``force``) an adapter.
    Missing parent folders are fine where they can be made (the write makes them)."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise LoraFxError(f"{d} is a file, not a directory: choose another output path")
    check_creatable_dir(d.parent.resolve())
    config = d / CONFIG_NAME
    if config.exists() and not is_adapter_config(config):
        raise LoraFxError(f"{config} is not an adapter's config (no peft_type): write the "
                          "adapter to another directory")
    if (config.exists() or (d / WEIGHTS_NAME).exists()) and not force:
        raise LoraFxError(f"{d} already holds an adapter: pass --force (force=True) to "
                          "overwrite it")
    return d


def write_adapter(adapter: Adapter, directory: str | Path, force: bool = False,
                  extra_config: dict[str, Any] | None = None) -> Path:
    """Write ``adapter`` in PEFT's layout, atomically; refuse to overwrite unless ``force``."""
    d = check_adapter_output(directory, force)
    config = adapter.config.to_peft_dict()
    config.update(extra_config or {})
    state = to_state(adapter)
    with atomic_dir(d, verify=lambda tmp: _check_written(tmp, state, d)) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if adapter.lorafx is not None:
            side = {"config": adapter.lorafx, "peft_config": json.loads(json.dumps(config))}
            (tmp / LORAFX_NAME).write_text(json.dumps(side, indent=2, sort_keys=True) + "\n")
    return d


def _check_written(tmp: Path, state: dict[str, torch.Tensor], d: Path) -> None:
    """Read the written adapter back before it replaces anything: same tensors, bit for bit."""
    try:
        json.loads((tmp / CONFIG_NAME).read_text())
        back = load_file(str(tmp / WEIGHTS_NAME))
    except Exception as err:
        raise LoraFxError(f"the adapter written for {d} does not read back ({err}); "
                          "nothing was changed: check the disk and try again") from err
    same = back.keys() == state.keys() and all(
        back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(
            back[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
        for k, t in state.items())
    if not same:
        raise LoraFxError(f"the adapter written for {d} reads back different tensors; "
                          "nothing was changed: check the disk and try again")
