"""LoraConfig: PEFT's field names and semantics, validated on construction."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from .errors import LoraFxError, LoraFxWarning

InitKind = bool | str
_INITS = (True, False, "gaussian", "pissa", "olora")  # pissa/olora: lora_fx.variants.init
LORAFX_ONLY = ("target_forms", "enable_lora", "autocast_adapter_dtype", "branch_compute")  # not
# PEFT LoraConfig fields: kept out of its JSON (autocast_adapter_dtype is an argument there)
COMPUTES = ("input", "adapter")


@dataclass
class LoraConfig:
    """Which sites get a LoRA branch and how it is shaped.

    ``target_modules``: a list matches a site whose name equals an entry or ends with ``.entry``;
    a string is a regular expression that must match the whole site name (PEFT's rules).
    ``rank_pattern`` / ``alpha_pattern`` map a regex (matched as ``(.*\\.)?(key)$``) to a
    per-site rank / alpha. The branch scale is ``s = alpha / r``, or ``alpha / sqrt(r)`` with
    ``use_rslora``. ``target_modules="all-linear"``: every linear-form site but the output head
    (PEFT's meaning; resolved by ``patterns.select``). ``target_parameters`` (PEFT's): parameter
    paths (an entry matches a path equal to it or ending with ``.entry``) whose every linear use
    gets LoRA on the parameter itself, ΔW_e = s·B_e A_e per expert of a 3-D stack [E, d1, d2]
    (``branches.LoraExperts``), as PEFT's ParamWrapper; like PEFT it refuses lora_dropout,
    fan_in_fan_out and use_dora.

    lorafx only (not PEFT's; never written into adapter_config.json): ``target_forms`` keeps
    sites whose form or kind it lists ("conv", "embedding", "matmul", "nn.Linear", ...) and,
    without ``target_modules``, targets all of them; ``enable_lora`` maps a key (matched as
    rank_pattern's) to loralib's slice mask, e.g. ``{"c_attn": [True, False, True]}``: LoRA on
    the q and v thirds of a fused projection only (``branches.LoraFused``).

    Precision (PEFT's policy): ``autocast_adapter_dtype`` (PEFT's ``get_peft_model`` argument
    of that name, default True) makes A and B fp32 on an fp16/bf16 (or narrower float) base,
    so that optimizer updates do not round away; False keeps the base weight's dtype.
    ``branch_compute`` (lorafx only) says where a branch whose factors differ in dtype from its
    input computes: "input" (default) casts A and B to the input's dtype inside the graph (fp32
    master weights, bf16 math, gradients back in fp32); "adapter" casts the input to the
    factors' dtype and Δ back, as PEFT does (exact, slower: an fp32 copy of each input).
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    target_parameters: list[str] | None = None
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
    # lorafx only (never written to adapter_config.json; see LORAFX_ONLY):
    target_forms: list[str] | None = None  # keep sites of these forms/kinds ("conv", "matmul")
    enable_lora: dict[str, list[bool]] = field(default_factory=dict)  # key → fused slice mask
    autocast_adapter_dtype: bool = True  # PEFT's get_peft_model argument: fp32 A, B on bf16
    branch_compute: str = "input"  # "input": in x's dtype from the factors; "adapter": PEFT's

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.target_parameters, (set, tuple)):
            self.target_parameters = sorted(self.target_parameters)
        self.validate()

    def validate(self) -> None:
        """Refuse values PEFT would refuse or that make no sense, with a one-line reason."""
        _check_types(self)
        if self.r < 1:
            raise LoraFxError(f"rank r={self.r!r} must be an integer >= 1")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise LoraFxError(f"lora_alpha={self.lora_alpha!r} must be a finite number > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise LoraFxError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        if self.init_lora_weights not in _INITS:
            raise LoraFxError(f"init_lora_weights={self.init_lora_weights!r} is not supported: "
                              "use true, false, 'gaussian', 'pissa' or 'olora' (pissa_niter_K "
                              "is randomized: loading could not recompute the residual)")
        if self.bias != "none":
            raise LoraFxError(f"bias={self.bias!r} is not supported: only 'none'")
        for key, rank in self.rank_pattern.items():
            if rank < 1:
                raise LoraFxError(f"rank_pattern[{key!r}]={rank!r} must be an integer >= 1")
        for key, alpha in self.alpha_pattern.items():
            if not (alpha > 0 and math.isfinite(alpha)):
                raise LoraFxError(f"alpha_pattern[{key!r}]={alpha!r} must be a finite number > 0")
        regexes = [("target_modules", self.target_modules), ("exclude_modules",
                   self.exclude_modules)] + [("rank_pattern", k) for k in self.rank_pattern] \
            + [("alpha_pattern", k) for k in self.alpha_pattern]
        for what, regex in regexes:
            if isinstance(regex, str):
                try:
                    re.compile(regex)
                except re.error as err:
                    raise LoraFxError(f"{what} regex {regex!r} is invalid: {err}") from err
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise LoraFxError("layers_to_transform cannot be used with a regex or 'all-linear' "
                              "target_modules (PEFT refuses it too): list the module names")
        if self.branch_compute not in COMPUTES:
            raise LoraFxError(f"branch_compute={self.branch_compute!r} must be one of "
                              f"{', '.join(COMPUTES)}")
        self._validate_parameters()
        for key, mask in self.enable_lora.items():
            if not any(mask):
                raise LoraFxError(f"enable_lora[{key!r}]={mask!r} needs at least one true "
                                  "slice, e.g. [true, false, true]")

    def _validate_parameters(self) -> None:
        """PEFT's ParamWrapper refusals, made when the config is built (PEFT: at injection)."""
        if not self.target_parameters:
            return
        for field_name, on in (("lora_dropout", self.lora_dropout != 0),
                               ("fan_in_fan_out", self.fan_in_fan_out),
                               ("use_dora", self.use_dora)):
            if on:
                raise LoraFxError(f"target_parameters does not work with {field_name}="
                                  f"{getattr(self, field_name)!r} (PEFT refuses it too): set "
                                  f"{field_name} off, or target modules instead")

    def targets_parameter(self, path: str) -> bool:
        """True when ``target_parameters`` names the parameter at ``path`` (PEFT's match: equal
        to an entry, or ending with ``.`` + entry)."""
        return any(path == key or path.endswith("." + key) for key in self.target_parameters or [])

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

    def slices_for(self, site: str) -> list[bool] | None:
        """The fused-slice mask of ``site`` (loralib's enable_lora), None for a plain LoRA."""
        key = self._pattern_key(self.enable_lora, site)
        return list(self.enable_lora[key]) if key is not None else None

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
        if site in tm:  # as PEFT: a full name is taken without the layers_to_transform check
            return True
        if not any(site.endswith("." + key) for key in tm):
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
        for key in LORAFX_ONLY:
            out.pop(key, None)
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
            kwargs[key] = kwargs.get(key) or {}
        _refuse_variants(data)
        unknown = sorted(k for k in data if k not in names and k not in _PEFT_IGNORED
                         and k not in _PEFT_VARIANTS and not _is_unset(data[k]))
        if unknown:
            warnings.warn(f"adapter_config.json keys {', '.join(unknown)} are unknown to lorafx "
                          "and ignored (PEFT ignores unknown keys the same way); if the adapter "
                          "was trained with them, its outputs may differ from PEFT's",
                          LoraFxWarning, stacklevel=2)
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise LoraFxError(f"invalid adapter_config.json: {err}") from err


# PEFT LoraConfig fields that do not change what a loaded adapter computes.
_PEFT_IGNORED = frozenset({
    "peft_type", "auto_mapping", "peft_version", "revision", "inference_mode", "megatron_config",
    "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "runtime_config", "qalora_group_size", "ensure_weight_tying"})
# PEFT LoraConfig fields that change the computation when set: refused unless unset.
_PEFT_VARIANTS = ("lora_bias", "layer_replication", "use_qalora", "alora_invocation_tokens",
                  "trainable_token_indices", "use_bdlora", "arrow_config",
                  "kasa_config", "monteclora_config", "velora_config")


def _refuse_variants(data: dict[str, Any]) -> None:
    for key in _PEFT_VARIANTS:
        if data.get(key):
            raise LoraFxError(f"adapter uses {key}={data[key]!r}, a LoRA variant lorafx does "
                              "not support: use a plain LoRA adapter")


def _is_unset(value: Any) -> bool:
    """A config value that turns its feature off: None, False or empty (a new PEFT release
    writes each new field at such a default, e.g. ``astra_config: null``)."""
    return value is None or value is False or (isinstance(value, (str, list, dict))
                                                and not value)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)


def _opt(check: Any) -> Any:
    return lambda v: v is None or check(v)


_TYPES: dict[str, tuple[Any, str]] = {  # field: (check, what it must be)
    "r": (_is_int, "an integer"),
    "lora_alpha": (_is_real, "a number"),
    "lora_dropout": (_is_real, "a number"),
    "target_modules": (_opt(lambda v: isinstance(v, str) or _is_str_list(v)),
                       "a list of names or a regex string"),
    "target_parameters": (_opt(_is_str_list), "a list of parameter names"),
    "exclude_modules": (_opt(lambda v: isinstance(v, str) or _is_str_list(v)),
                        "a list of names or a regex string"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)), "true, false or a name"),
    "bias": (lambda v: isinstance(v, str), "a string"),
    "rank_pattern": (lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and _is_int(x) for k, x in v.items()), "a map of regex to integer"),
    "alpha_pattern": (lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and _is_real(x) for k, x in v.items()), "a map of regex to number"),
    "modules_to_save": (_opt(_is_str_list), "a list of module names"),
    "layers_to_transform": (_opt(lambda v: _is_int(v) or (isinstance(v, (list, tuple)) and all(
        _is_int(x) for x in v))), "an integer or a list of integers"),
    "layers_pattern": (_opt(lambda v: isinstance(v, str) or _is_str_list(v)),
                       "a name or a list of names"),
    "base_model_name_or_path": (_opt(lambda v: isinstance(v, str)), "a string"),
    "task_type": (_opt(lambda v: isinstance(v, str)), "a string"),
    "target_forms": (_opt(_is_str_list), "a list of form names"),
    "autocast_adapter_dtype": (lambda v: isinstance(v, bool), "true or false"),
    "branch_compute": (lambda v: isinstance(v, str), "a string"),
    "enable_lora": (lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(m, (list, tuple)) and all(isinstance(b, bool) for b in m)
        for k, m in v.items()), "a map of regex to a list of true/false"),
}


def _check_types(config: LoraConfig) -> None:
    """Refuse a field of the wrong type (e.g. ``"r": "8"`` in a JSON file) in one line."""
    for name, (check, what) in _TYPES.items():
        if hasattr(config, name) and not check(getattr(config, name)):
            value = getattr(config, name)
            raise LoraFxError(f"{name}={value!r} ({type(value).__name__}) must be {what}: fix "
                              "the value")
