"""The pass runner: run a pass, lint and recompile its graph, name the pass when it fails."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from torch import fx

from ..errors import LoraFxError


class PassResult(NamedTuple):
    gm: fx.GraphModule
    modified: bool             # False: the graph is as it was (no lint, no recompile needed)
    counts: dict[str, int]     # what the pass did, e.g. {"injected": 12}


def run_pass(name: str, fn: Callable[..., PassResult], gm: fx.GraphModule, *args: Any,
             **kwargs: Any) -> PassResult:
    """Run ``fn(gm, *args, **kwargs)``, then, if it changed the graph, ``graph.lint()`` and
    ``recompile()``.

    A graph left invalid, or a pass failing with anything but a LoraFxError (which already
    explains bad input), raises LoraFxError naming the pass (a bug in lorafx, not the input).
    """
    try:
        result = fn(gm, *args, **kwargs)
    except LoraFxError:
        raise
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise LoraFxError(f"internal error: pass {name!r} failed with {type(err).__name__}: "
                          f"{first}; please report it with the model that triggered it") from err
    if not result.modified:
        return result
    try:
        result.gm.graph.lint()
        result.gm.recompile()
    except Exception as err:
        raise LoraFxError(f"internal error: pass {name!r} left an invalid graph ({err}); "
                          "please report it with the model that triggered it") from err
    return result
