"""PEFT's adapter directory, both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys: ``base_model.model.<site>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r);
modules_to_save tensors as ``base_model.model.<module>.<param>``. Loading never unpickles:
safetensors only, and an ``adapter_model.bin`` is refused with advice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import LoraConfig
from .errors import LoraFxError
from .fileio import atomic_dir

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


@dataclass
class Adapter:
    """An adapter in memory: its config, and per site the (A, B) pair in PEFT's layout."""

    config: LoraConfig
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    saved: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save tensors

    def delta(self, site: str) -> torch.Tensor:
        """ΔW = s · B @ A in fp32, shaped like a [out, in] weight."""
        a, b = self.lora[site]
        return self.config.scale_for(site) * (b.float().flatten(1) @ a.float().flatten(1))


def to_state(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The safetensors dict PEFT writes for ``adapter``."""
    out: dict[str, torch.Tensor] = {}
    for site, (a, b) in sorted(adapter.lora.items()):
        out[f"{PREFIX}{site}.lora_A.weight"] = a.detach().contiguous().cpu()
        out[f"{PREFIX}{site}.lora_B.weight"] = b.detach().contiguous().cpu()
    for name, t in sorted(adapter.saved.items()):
        out[f"{PREFIX}{name}"] = t.detach().contiguous().cpu()
    return out


def from_state(config: LoraConfig, state: dict[str, torch.Tensor], where: str) -> Adapter:
    """Split PEFT's flat key space into LoRA pairs and modules_to_save tensors."""
    a_s: dict[str, torch.Tensor] = {}
    b_s: dict[str, torch.Tensor] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        name = name.replace(".default.", ".")  # keys saved with the adapter name left in
        for tag, bucket in ((".lora_A.weight", a_s), (".lora_B.weight", b_s)):
            if name.endswith(tag):
                bucket[name[: -len(tag)]] = t
                break
        else:
            if ".lora_" in name or name.endswith("lora_magnitude_vector"):
                raise LoraFxError(f"{where}: key {key!r} is a LoRA variant lorafx does not load")
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
    return Adapter(config, lora, saved)


def read_adapter(directory: str | Path) -> Adapter:
    """Load an adapter dir written by lorafx or PEFT (safetensors only, never pickle)."""
    d = Path(directory)
    if not d.is_dir():
        raise LoraFxError(f"adapter directory {d} does not exist: pass the directory that holds "
                          f"{CONFIG_NAME}")
    cfg_path, weights = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not weights.exists() and (d / "adapter_model.bin").exists():
        raise LoraFxError(f"{d / 'adapter_model.bin'} is a pickle, which lorafx never loads: "
                          "convert it to safetensors (in PEFT: save_pretrained("
                          "safe_serialization=True))")
    if not cfg_path.exists():
        raise LoraFxError(f"{cfg_path} is missing: not an adapter directory")
    if not weights.exists():
        raise LoraFxError(f"{weights} is missing: the adapter directory is incomplete")
    try:
        data = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LoraFxError(f"{cfg_path} is not valid JSON ({err}): fix or re-save it") from err
    if not isinstance(data, dict):
        raise LoraFxError(f"{cfg_path} must hold a JSON object")
    config = LoraConfig.from_peft_dict(data)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise LoraFxError(f"{weights} is not a readable safetensors file ({err}): re-save "
                          "the adapter") from err
    if not state:
        raise LoraFxError(f"{weights} holds no tensors: the adapter is empty")
    return from_state(config, state, str(d))


def write_adapter(adapter: Adapter, directory: str | Path, force: bool = False,
                  extra_config: dict[str, Any] | None = None) -> Path:
    """Write ``adapter`` in PEFT's layout, atomically; refuse to overwrite unless ``force``."""
    d = Path(directory)
    if (d / WEIGHTS_NAME).exists() and not force:
        raise LoraFxError(f"{d} already holds an adapter: pass --force (force=True) to "
                          "overwrite it")
    config = adapter.config.to_peft_dict()
    config.update(extra_config or {})
    with atomic_dir(d) as tmp:
        save_file(to_state(adapter), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return d
