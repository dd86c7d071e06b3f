"""An injected model's adapter in and out: PEFT's view of its config, save, load, apply.

Saving lives in ``model.saving`` (the injected model's ``save_pretrained`` uses it, and
loading injects); both are imported from here.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..adapter.origin import warn_if_other_model
from ..adapter.peft import MAGNITUDE_KEY, Adapter, read_adapter
from ..branches.base import copy_checked
from ..config import LoraConfig
from ..errors import LoraFxError, some
from ..graph.state import require_state
from ..variants.init import reads_weight
from .inject import inject
from .params import branches
from .saving import layout_config, save_adapter, to_adapter

__all__ = ["apply_adapter", "layout_config", "load_adapter", "save_adapter", "to_adapter"]


def load_adapter(model: nn.Module, example_inputs: tuple[Any, ...], directory: str | Path,
                 dynamic_shapes: Any = None, autocast_adapter_dtype: bool = True,
                 model_names: list[str] | None = None) -> fx.GraphModule:
    """Inject the adapter in ``directory`` (written by lorafx or PEFT) into ``model``.

    ``autocast_adapter_dtype`` (PEFT's ``from_pretrained`` argument): the factors are fp32 on
    an fp16/bf16 base whatever dtype the file holds; False keeps the base's dtype. Warns when
    the adapter's ``base_model_name_or_path`` names another model than ``model_names``
    (default: a transformers model's ``name_or_path``).
    """
    adapter = read_adapter(directory)
    names = model_names if model_names is not None else [getattr(model, "name_or_path", "")]
    warn_if_other_model(adapter.config.base_model_name_or_path, names, f"adapter {directory}")
    return apply_adapter(model, example_inputs, adapter, dynamic_shapes, where=str(directory),
                         autocast_adapter_dtype=autocast_adapter_dtype)


def apply_adapter(model: nn.Module, example_inputs: tuple[Any, ...], adapter: Adapter,
                  dynamic_shapes: Any = None, where: str = "adapter",
                  autocast_adapter_dtype: bool = True) -> fx.GraphModule:
    """Inject ``adapter.config`` and copy its weights in, checking every site and shape."""
    config = LoraConfig.from_peft_dict(adapter.lorafx) if adapter.lorafx else \
        copy.copy(adapter.config)
    config.autocast_adapter_dtype = autocast_adapter_dtype
    if not reads_weight(config.init_lora_weights):  # PiSSA/OLoRA recompute W_res, as PEFT
        config.init_lora_weights = False
    try:
        gm = inject(model, example_inputs, config, dynamic_shapes)
    except LoraFxError as err:
        if "matches no site" not in str(err):
            raise
        raise LoraFxError(f"{where}: no site of the adapter ({some(sorted(adapter.lora))}) is in "
                          "this model: the adapter belongs to another model") from err
    state = require_state(gm)
    adapter = by_site(gm, adapter)
    have, want = set(state.sites), set(adapter.lora)
    if want - have:
        raise LoraFxError(f"{where}: site {sorted(want - have)[0]!r} of the adapter is not in "
                          "this model: the adapter belongs to another model")
    if have - want:
        raise LoraFxError(f"{where}: site {sorted(have - want)[0]!r} has no weights in the "
                          "adapter: the adapter is incomplete or for another model")
    load_weights(gm, adapter, where)
    return gm


def by_site(gm: nn.Module, adapter: Adapter) -> Adapter:
    """``adapter`` with its factors keyed by ``gm``'s site names: PEFT keys a target_parameters
    site by its module path (``mlp.experts.base_layer`` when wrappers nest: ``peft_name``)."""
    names = {b.peft_name: name for name, b in branches(gm).items() if b.peft_name}
    if not names:
        return adapter
    lora = {names.get(key, key): pair for key, pair in adapter.lora.items()}
    return dataclasses.replace(adapter, lora=lora)


def load_weights(gm: nn.Module, adapter: Adapter, where: str) -> None:
    """Copy ``adapter``'s tensors into the injected ``gm`` with the same sites: A and B, each
    branch's extras (DoRA's m) and the modules_to_save tensors, checking every shape."""
    with torch.no_grad():
        for name, branch in branches(gm).items():
            branch.load_factors(*adapter.lora[name], where=f"{where}: {name}")
            extra = {MAGNITUDE_KEY: adapter.magnitude[name]} if name in adapter.magnitude else {}
            branch.load_extra(extra, f"{where}: {name}")
        for key, t in adapter.saved.items():
            try:
                target = gm.get_parameter(key)
            except AttributeError as err:
                raise LoraFxError(f"{where}: saved module tensor {key!r} is not in this model"
                                  ) from err
            copy_checked(target, t, f"{where}: {key}")
