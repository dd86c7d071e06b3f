"""The pass runner: a pass that leaves an invalid graph or crashes is named in a one-line
error; a LoraFxError raised by a pass passes through unchanged."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import fx, nn

from lora_fx.errors import LoraFxError
from lora_fx.passes.runner import PassResult, run_pass


def _traced() -> Any:
    return fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3)))


def test_runner_names_a_pass_that_breaks_the_graph() -> None:
    def use_before_define(gm: Any) -> PassResult:
        x = next(iter(gm.graph.nodes))
        with gm.graph.inserting_before(x):
            gm.graph.call_function(torch.relu, (x,))
        return PassResult(gm, True, {})

    with pytest.raises(LoraFxError, match="pass 'use_before_define' left an invalid graph"):
        run_pass("use_before_define", use_before_define, _traced())


def test_runner_names_a_pass_that_crashes() -> None:
    def crash(gm: Any) -> PassResult:
        raise KeyError("boom")

    def refuse(gm: Any) -> PassResult:
        raise LoraFxError("bad input, explained")

    with pytest.raises(LoraFxError, match="pass 'crash' failed with KeyError"):
        run_pass("crash", crash, _traced())
    with pytest.raises(LoraFxError, match="^bad input, explained$"):
        run_pass("refuse", refuse, _traced())

