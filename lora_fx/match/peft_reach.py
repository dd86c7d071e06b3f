"""Which sites PEFT can reach too (``lorafx inspect``'s peft column).
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from .matcher import Site


# --- PEFT reach ---------------------------------------------------------------------------
def _resolve(qualname: str) -> type | None:
    """The class named ``qualname`` if its module is already imported (never imports)."""
    modname, _, attr = qualname.rpartition(".")
    obj: Any = sys.modules.get(modname)
    for part in attr.split(".") if obj is not None else []:
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) else None


def _is_hf_conv1d(cls: type) -> bool:
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers")
               for c in cls.__mro__)


def peft_reachable(site: Site) -> bool:
    """True when PEFT's LoRA can wrap the module running this op and computes the same Δ.

    PEFT wraps nn.Linear, HF Conv1D, nn.Conv1d/2d/3d (without dilation or a padding mode, which
    its A conv drops), nn.Embedding and nn.MultiheadAttention (in_proj_weight and out_proj,
    always together); a weight read functionally, outside its module's own op, is out of reach.
    An expert stack [E, d1, d2] is reached by ``target_parameters`` where the module running
    the op owns it (PEFT's ParamWrapper adds s·ΔW_e to the parameter itself).
    """
    if site.kind == "experts":
        return bool(site.module) and site.weight.rpartition(".")[0] == site.module
    cls = _resolve(site.module_type) if site.module_type else None
    if cls is None:
        return False
    if issubclass(cls, nn.MultiheadAttention):
        return site.name in (f"{site.module}.in_proj_weight", f"{site.module}.out_proj")
    if site.name != site.module:
        return False
    if site.kind == "linear":
        return (issubclass(cls, nn.Linear) and site.form in ("nn.Linear", "F.linear")) or \
            (_is_hf_conv1d(cls) and site.form == "addmm")
    if site.kind == "conv":
        g = site.geometry
        return issubclass(cls, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and \
            set(g["dilation"]) == {1} and g["padding_mode"] == "zeros"
    return site.kind == "embedding" and issubclass(cls, nn.Embedding)

