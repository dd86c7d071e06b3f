"""Build models on the meta device: shapes only, no weights, no initialisation work.

Building a model on the meta device still runs its initializers (``nn.init.normal_`` …): they do
no work there, but the first ``normal_`` on a meta tensor imports ``torch._dynamo`` (seconds).
:func:`meta_device` skips every initializer whose tensor is on the meta device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

_INIT_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    [getattr(nn.init, n) for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    + [torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_,
       torch.Tensor.exponential_, torch.Tensor.log_normal_, torch.Tensor.random_,
       torch.Tensor.bernoulli_, torch.Tensor.geometric_, torch.Tensor.cauchy_])


class SkipMetaInit(TorchFunctionMode):
    """Initializers (``nn.init.*_``, ``Tensor.normal_`` …) return meta tensors untouched."""

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _INIT_FUNCTIONS:
            target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """``torch.device("meta")`` for everything built inside, initializers skipped."""
    with torch.device("meta"), SkipMetaInit():
        yield

