"""The training loop ``lorafx train`` runs: AdamW on the LoRA parameters of an injected model.

Each step takes the next ``(inputs, target)`` of the model file's ``train_batches()`` (started
again when it runs out), computes ``loss_fn(model(*inputs), target)`` on ``training_graph(gm)``
(the same parameters, a faster graph) and steps. ``gm`` itself keeps the captured graph, so it is
what is evaluated and saved. Batches are moved to the model's device (``Placement``), and the
forward runs under ``torch.autocast`` where asked (bf16 autocast: fp32 weights, bf16 GEMMs).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from ..load.device import moved
from ..load.model import LoadedModel
from ..model.params import lora_parameters
from .fast import training_graph

Batch = tuple[tuple[Any, ...], Any]


@dataclass(frozen=True)
class Placement:
    """Where batches go (the model's device; floating inputs in its dtype) and the autocast
    dtype of the forward (None: none)."""

    device: torch.device | None = None
    dtype: torch.dtype | None = None
    autocast: torch.dtype | None = None

    def batch(self, batch: Batch) -> Batch:
        inputs, target = batch
        return moved(inputs, self.device, self.dtype), moved(target, self.device)

    def forward(self) -> Any:
        if self.autocast is None:
            return contextlib.nullcontext()
        kind = self.device.type if self.device is not None else "cpu"
        return torch.autocast(kind, dtype=self.autocast)


@dataclass
class TrainReport:
    steps: int
    seconds: float
    final_loss: float
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None


def evaluate(gm: Any, batches: Iterable[Batch], loss_fn: Any,
             placement: Placement = Placement()) -> dict[str, float]:
    """Mean loss over ``batches`` and, for integer class targets, accuracy (argmax)."""
    gm.eval()
    total, correct, loss_sum, n_batches = 0, 0, 0.0, 0
    with torch.no_grad():
        for batch in batches:
            inputs, target = placement.batch(batch)
            with placement.forward():
                out = gm(*inputs)
            if loss_fn is not None:
                loss_sum += float(loss_fn(out, target))
                n_batches += 1
            if isinstance(out, torch.Tensor) and isinstance(target, torch.Tensor) and \
                    not target.is_floating_point() and out.dim() == target.dim() + 1:
                correct += int((out.argmax(-1) == target).sum())
                total += target.numel()
    result = {"loss": loss_sum / max(n_batches, 1)}
    if total:
        result["accuracy"] = correct / total
    return result


def _cycle(make: Callable[[], Iterable[Batch]]) -> Iterator[Batch]:
    """The batches of ``make()``, started again each time they run out."""
    while True:
        yield from make()


def train(gm: fx.GraphModule, loaded: LoadedModel, steps: int, lr: float = 1e-3,
          weight_decay: float = 0.0, on_step: Callable[[int, float], None] | None = None,
          placement: Placement = Placement()) -> TrainReport:
    """Train ``gm``'s LoRA parameters for ``steps`` AdamW steps on ``loaded``'s batches and
    loss; held-out metrics before and after when ``loaded`` has ``eval_batches``.
    ``on_step(step, loss)`` is called after every step (a progress bar)."""
    assert loaded.train_batches is not None and loaded.loss_fn is not None
    held_out = loaded.eval_batches
    before = evaluate(gm, held_out(), loaded.loss_fn, placement) if held_out else None
    opt = torch.optim.AdamW(lora_parameters(gm), lr=lr, weight_decay=weight_decay)
    step_gm = training_graph(gm).train()
    start, last = time.perf_counter(), float("nan")
    batches = _cycle(loaded.train_batches)
    for step in range(steps):
        inputs, target = placement.batch(next(batches))
        with placement.forward():
            loss = loaded.loss_fn(step_gm(*inputs), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = float(loss)
        if on_step is not None:
            on_step(step, last)
    seconds = time.perf_counter() - start
    after = evaluate(gm, held_out(), loaded.loss_fn, placement) if held_out else None
    return TrainReport(steps, seconds, last, before, after)
