"""PEFT's ``target_parameters``: which parameters it names, how PEFT orients and keys them.

PEFT wraps the module owning each named parameter in a ``ParamWrapper`` that adds s·ΔW to the
parameter wherever the module reads it. lorafx reaches the same tensor through the ops that read
it (an expert stack's ``bmm(W[ids], x)``, a 2-D weight's linear op), so a named parameter must
be a site's weight. Two facts of PEFT's layout come from the model, not the graph:

- orientation: an expert stack is [E, out, in] unless its module says ``is_transposed``
  ([E, in, out]); A and B follow it (``branches.LoraExperts``);
- keys: several parameters of one module nest their wrappers in the order the module registers
  them, the first innermost, and each wrapper above adds ``.base_layer`` to the key of those
  below: with gate_up_proj and down_proj of ``mlp.experts`` targeted, gate_up_proj's factors are
  ``mlp.experts.base_layer.lora_A.weight`` and down_proj's ``mlp.experts.lora_A.weight``.
"""

from __future__ import annotations

from torch import nn

from ..config import LoraConfig
from ..errors import LoraFxError, some
from .matcher import Site


def owner_of(path: str) -> tuple[str, str]:
    """(module path, parameter name) of the parameter at ``path``."""
    module, _, name = path.rpartition(".")
    return module, name


def peft_transposed(model: nn.Module, path: str) -> bool:
    """PEFT's orientation of a 3-D parameter: its owning module's ``is_transposed``."""
    try:
        owner = model.get_submodule(owner_of(path)[0])
    except AttributeError:
        return False
    return bool(getattr(owner, "is_transposed", False))


def peft_key(model: nn.Module, path: str, config: LoraConfig) -> str:
    """The module path PEFT saves the factors of the parameter at ``path`` under: its owner,
    plus ``.base_layer`` per targeted parameter the owner registers after it."""
    module, name = owner_of(path)
    try:
        names = [n for n, _ in model.get_submodule(module).named_parameters(recurse=False)]
    except AttributeError:
        names = [name]
    later = names[names.index(name) + 1:] if name in names else []
    nested = sum(config.targets_parameter(f"{module}.{n}" if module else n) for n in later)
    return module + ".base_layer" * nested


def annotate(sites: list[Site], model: nn.Module, config: LoraConfig) -> None:
    """Record PEFT's orientation and key (``geometry``) on each site that target_parameters
    chose; refuse a 2-D one that PEFT would orient otherwise than its op."""
    for site in sites:
        if not config.targets_parameter(site.weight):
            continue
        if site.kind == "linear" and site.layout != "out_in":
            raise LoraFxError(f"target_parameters names {site.weight!r}, an [in, out] weight "
                              f"({site.form}), which PEFT's ParamWrapper would treat as [out, in]:"
                              " target its module with target_modules instead")
        if site.kind not in ("linear", "experts"):
            raise LoraFxError(f"target_parameters names {site.weight!r}, a {site.kind} weight: "
                              "PEFT's ParamWrapper takes linear weights; use target_modules")
        site.geometry["peft_transposed"] = peft_transposed(model, site.weight)
        key = peft_key(model, site.weight, config)
        if key != site.name:
            site.geometry["peft_name"] = key


def check_named(config: LoraConfig, model: nn.Module, chosen: list[Site]) -> None:
    """Each target_parameters entry names a parameter, and each named parameter is the weight of
    a chosen site (a 3-D expert stack or a 2-D linear weight); else one line saying which."""
    params = dict(model.named_parameters())
    read = {s.weight for s in chosen}
    for key in config.target_parameters or []:
        named = [p for p in params if p == key or p.endswith("." + key)]
        if not named:
            raise LoraFxError(f"target_parameters entry {key!r} matches no parameter: closest: "
                              f"{some(list(params), [key])}; name a parameter path such as "
                              "'mlp.experts.gate_up_proj'")
        for path in named:
            if path not in read:
                shape = list(params[path].shape)
                raise LoraFxError(f"target_parameters names {path!r} ({len(shape)}-D {shape}), "
                                  "which no linear op of the model reads as a weight: name a "
                                  "3-D expert parameter [experts, d1, d2] or a 2-D linear weight")
