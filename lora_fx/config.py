"""LoraConfig: PEFT's field names and semantics, validated on construction."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import LoraFxError

InitKind = bool | str
_INITS = (True, False, "gaussian")


@dataclass
class LoraConfig:
    """Which sites get a LoRA branch and how it is shaped.

    ``target_modules``: a list matches a site whose name equals an entry or ends with ``.entry``;
    a string is a regular expression that must match the whole site name (PEFT's rules).
    ``rank_pattern`` / ``alpha_pattern`` map a regex (matched as ``(.*\\.)?(key)$``) to a
    per-site rank / alpha. The branch scale is ``s = alpha / r``, or ``alpha / sqrt(r)`` with
    ``use_rslora``.
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: InitKind = True
    fan_in_fan_out: bool = False
    bias: str = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    use_dora: bool = False
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        self.validate()

    def validate(self) -> None:
        """Refuse values PEFT would refuse or that make no sense, with a one-line reason."""
        if not isinstance(self.r, int) or self.r < 1:
            raise LoraFxError(f"rank r={self.r!r} must be an integer >= 1")
        if not self.lora_alpha > 0:
            raise LoraFxError(f"lora_alpha={self.lora_alpha!r} must be > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise LoraFxError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        if self.init_lora_weights not in _INITS:
            raise LoraFxError(f"init_lora_weights={self.init_lora_weights!r} is not supported: "
                              "use true, false or 'gaussian'")
        if self.bias != "none":
            raise LoraFxError(f"bias={self.bias!r} is not supported: only 'none'")
        if self.use_dora:
            raise LoraFxError("use_dora=true is not supported yet: train a plain LoRA adapter")
        for key, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank < 1:
                raise LoraFxError(f"rank_pattern[{key!r}]={rank!r} must be an integer >= 1")
        for key, alpha in self.alpha_pattern.items():
            if not alpha > 0:
                raise LoraFxError(f"alpha_pattern[{key!r}]={alpha!r} must be > 0")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise LoraFxError(f"target_modules regex {self.target_modules!r} is invalid: "
                                  f"{err}") from err

    # --- per-site values (PEFT's get_pattern_key) ---------------------------------------
    @staticmethod
    def _pattern_key(patterns: dict[str, Any], site: str) -> str | None:
        for key in patterns:
            if re.match(rf"(.*\.)?({key})$", site):
                return key
        return None

    def rank_for(self, site: str) -> int:
        key = self._pattern_key(self.rank_pattern, site)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, site: str) -> float:
        key = self._pattern_key(self.alpha_pattern, site)
        return float(self.alpha_pattern[key]) if key is not None else float(self.lora_alpha)

    def scale_for(self, site: str) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski, 2023)."""
        r = self.rank_for(site)
        alpha = self.alpha_for(site)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # --- targeting (PEFT's check_target_module_exists) -----------------------------------
    def is_excluded(self, site: str) -> bool:
        ex = self.exclude_modules
        if ex is None:
            return False
        if isinstance(ex, str):
            return re.fullmatch(ex, site) is not None
        return site in ex or any(site.endswith("." + key) for key in ex)

    def targets(self, site: str) -> bool:
        """True when ``site`` is named by ``target_modules`` (and not excluded)."""
        tm = self.target_modules
        if tm is None or self.is_excluded(site) or self.saves(site):
            return False
        if isinstance(tm, str):
            return re.fullmatch(tm, site) is not None
        if not (site in tm or any(site.endswith("." + key) for key in tm)):
            return False
        return self._layer_ok(site)

    def saves(self, module: str) -> bool:
        """True when ``module`` (or a parent of it) is listed in ``modules_to_save``."""
        return any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in self.modules_to_save or [])

    def _layer_ok(self, site: str) -> bool:
        layers = self.layers_to_transform
        if layers is None or layers == []:
            return True
        pattern = self.layers_pattern
        if not pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", site)
        else:
            match = None
            for p in [pattern] if isinstance(pattern, str) else pattern:
                match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", site)
                if match:
                    break
        if match is None:
            return False
        idx = int(match.group("idx"))
        return idx == layers if isinstance(layers, int) else idx in layers

    # --- PEFT's adapter_config.json ---------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        """The adapter_config.json that PEFT's ``LoraConfig.from_pretrained`` reads."""
        out = dataclasses.asdict(self)
        out.update(peft_type="LORA", inference_mode=True, lora_bias=False, layers_pattern=None
                   if self.layers_pattern is None else self.layers_pattern)
        return out

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Read PEFT's adapter_config.json fields, refusing values lorafx cannot honour."""
        if data.get("peft_type", "LORA") != "LORA":
            raise LoraFxError(f"adapter peft_type={data.get('peft_type')!r} is not LORA: lorafx "
                              "loads LoRA adapters only")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for key in ("rank_pattern", "alpha_pattern"):
            kwargs[key] = dict(kwargs.get(key) or {})
        if data.get("lora_bias"):
            raise LoraFxError("adapter uses lora_bias=true, which lorafx does not support")
        if data.get("layer_replication"):
            raise LoraFxError("adapter uses layer_replication, which lorafx does not support")
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise LoraFxError(f"invalid adapter_config.json: {err}") from err
