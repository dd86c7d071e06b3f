"""Capture of models that return a KV cache: the cache is switched off while capturing.

A Hugging Face decoder built from its default config (``use_cache=True``) returns a cache
object (``DynamicCache``) beside its logits; ``torch.export`` cannot return such an object and
fails after tracing the whole model ("Found DynamicCache in output"). The cache only serves
generation, which the plain forward does not do: capture runs with ``use_cache=False`` on
every config the model holds, so the captured graph returns the logits (and the rest of the
output) with an empty cache field; each config gets its own value back afterwards. A decoder
exported *with* its cache goes through ``onnx.kv_cache``, which passes ``use_cache=True``
explicitly and returns the cache's tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn


def cache_configs(model: nn.Module) -> list[Any]:
    """The distinct config objects of ``model`` and its submodules (and their text configs)
    that turn a cache on (``use_cache`` True)."""
    found: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None:
            continue
        candidates = [config]
        with contextlib.suppress(Exception):  # configs without text sub-config
            candidates.append(config.get_text_config())
        for c in candidates:
            if getattr(c, "use_cache", False) is True:
                found.setdefault(id(c), c)
    return list(found.values())


@contextlib.contextmanager
def no_cache(model: nn.Module) -> Iterator[None]:
    """``use_cache=False`` on every config of ``model`` inside the block, restored after
    (also on error)."""
    configs = cache_configs(model)
    for c in configs:
        c.use_cache = False
    try:
        yield
    finally:
        for c in configs:
            c.use_cache = True
