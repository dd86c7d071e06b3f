"""Where and in what precision a loaded model runs: ``--device`` and ``--dtype`` of the CLI.

A model is placed before it is captured, so that capture, merge and export happen where the
weights live (the graph bakes that device in; ``graph.portable`` retargets it on a later move).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..errors import LoraFxError
from .model import LoadedModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cuda_absent_reason() -> str | None:
    """Why PyTorch cannot use a CUDA GPU here, or None when it can."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"this PyTorch ({torch.__version__}) is built without CUDA"
    return f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}) finds no CUDA GPU or driver"


def resolve_device(name: str | None) -> torch.device | None:
    """The torch device ``--device NAME`` asks for (None: leave the model where it is);
    a CUDA device that is not usable here is refused in one line."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise LoraFxError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        reason = cuda_absent_reason()
        if reason is not None:
            raise LoraFxError(f"--device {name}: {reason}; use --device cpu, or install a "
                              "CUDA build of PyTorch on a machine with an NVIDIA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LoraFxError(f"--device {name}: only {torch.cuda.device_count()} CUDA "
                              "device(s) here")
    return device


def resolve_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise LoraFxError(f"dtype {name!r} is not supported: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def moved(tree: Any, device: torch.device | None, dtype: torch.dtype | None = None) -> Any:
    """Every tensor of ``tree`` on ``device``; floating ones also cast to ``dtype``."""
    def move(t: torch.Tensor) -> torch.Tensor:
        cast = dtype if dtype is not None and t.is_floating_point() else None
        return t.to(device=device, dtype=cast)

    return pytree.tree_map_only(torch.Tensor, move, tree)


def place(loaded: LoadedModel, device: torch.device | None, dtype: torch.dtype | None = None
          ) -> LoadedModel:
    """``loaded`` with its module and example inputs on ``device`` in ``dtype`` (in place)."""
    if device is None and dtype is None:
        return loaded
    loaded.module.to(device=device, dtype=dtype)
    loaded.example_inputs = tuple(moved(loaded.example_inputs, device, dtype))
    return loaded
