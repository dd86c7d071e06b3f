"""LoRA+ (Hayou et al. 2024): B learns faster than A, η_B = ratio · η_A.

PEFT's ``create_loraplus_optimizer`` semantics on an injected GraphModule's trainable
parameters (named as in ``gm.named_parameters()``):

- group A: every other trainable parameter (lora_A, 2-D modules_to_save weights):
  lr = η, weight_decay = ``loraplus_weight_decay``;
- group B: ``lora_B`` and every 1-D parameter (DoRA's magnitude, biases, norms):
  lr = ratio · η; weight_decay = ``loraplus_weight_decay`` unless the parameter is a bias
  (name contains "bias") or sits in a LayerNorm, which get 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import LoraFxError


def _in_layernorm(root: nn.Module, name: str) -> bool:
    """True when a module on the path of parameter ``name`` is a LayerNorm."""
    mod: nn.Module = root
    for part in name.split(".")[:-1]:
        mod = getattr(mod, part)
        if isinstance(mod, nn.LayerNorm):
            return True
    return False


def loraplus_param_groups(gm: nn.Module, lr: float, loraplus_lr_ratio: float,
                          loraplus_weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """The optimizer parameter groups of LoRA+ (see the module docstring); empty groups are
    dropped. Raises LoraFxError when ``gm`` has no trainable parameter or ratio <= 0."""
    if not loraplus_lr_ratio > 0:
        raise LoraFxError(f"loraplus_lr_ratio={loraplus_lr_ratio!r} must be > 0 (the paper "
                          "uses 2 to 16 for B over A)")
    group_a: list[torch.Tensor] = []
    group_b: list[torch.Tensor] = []
    group_b_no_decay: list[torch.Tensor] = []
    for name, param in gm.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_B" in name or param.ndim == 1:
            decays = "bias" not in name and not _in_layernorm(gm, name)
            (group_b if decays else group_b_no_decay).append(param)
        else:
            group_a.append(param)
    if not (group_a or group_b or group_b_no_decay):
        raise LoraFxError("the model has no trainable parameter: pass the GraphModule returned "
                          "by lora_fx.inject or lora_fx.load_adapter")
    groups = [
        {"params": group_a, "lr": lr, "weight_decay": loraplus_weight_decay},
        {"params": group_b, "lr": lr * loraplus_lr_ratio, "weight_decay": loraplus_weight_decay},
        {"params": group_b_no_decay, "lr": lr * loraplus_lr_ratio, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def create_loraplus_optimizer(gm: nn.Module, optimizer_cls: type[torch.optim.Optimizer], *,
                              lr: float, loraplus_lr_ratio: float,
                              **kwargs: Any) -> torch.optim.Optimizer:
    """``optimizer_cls`` over :func:`loraplus_param_groups`, as PEFT's function of the same name:
    ``loraplus_weight_decay`` (default 0) is taken from ``kwargs``, the rest goes to the
    optimizer (``lr`` is its default lr)."""
    weight_decay = float(kwargs.pop("loraplus_weight_decay", 0.0))
    kwargs.pop("loraplus_lr_embedding", None)  # lorafx puts no LoRA on embeddings
    groups = loraplus_param_groups(gm, lr, loraplus_lr_ratio, weight_decay)
    kwargs["lr"] = lr
    return optimizer_cls(groups, **kwargs)
