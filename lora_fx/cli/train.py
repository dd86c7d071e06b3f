"""``lorafx train``: train an adapter with the model file's batches and loss.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import Any

import click
import torch

from ..errors import LoraFxError
from ..load.model import load_model
from ..model.adapters import load_adapter, save_adapter
from ..model.params import lora_parameters
from ..train.fast import training_graph
from .common import echo_json


def _evaluate(gm: Any, batches: Iterable[Any], loss_fn: Any) -> dict[str, float]:
    """Mean loss and, for integer class targets, accuracy."""

    gm.eval()
    total, correct, loss_sum, n_batches = 0, 0, 0.0, 0
    with torch.no_grad():
        for inputs, target in batches:
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


@click.command("train")
@click.argument("model")
@click.option("--adapter", "adapter_dir", required=True, type=click.Path(),
              help="Adapter directory (read, trained, written back).")
@click.option("--steps", type=int, default=100, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
def train_command(model: str, adapter_dir: str, steps: int, lr: float, weight_decay: float,
                  seed: int, as_json: bool) -> None:
    """Train the adapter with MODEL's train_batches() and loss_fn(), then save it back."""


    if steps < 1:
        raise LoraFxError(f"--steps {steps} must be >= 1")
    loaded = load_model(model)
    if loaded.train_batches is None or loaded.loss_fn is None:
        raise LoraFxError(f"{model} defines no train_batches()/loss_fn(): add both to train "
                          "with `lorafx train`")
    torch.manual_seed(seed)
    gm = load_adapter(loaded.module, loaded.example_inputs, adapter_dir,
                          loaded.dynamic_shapes)
    before = _evaluate(gm, loaded.eval_batches(), loaded.loss_fn) if loaded.eval_batches \
        else None
    params = lora_parameters(gm)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    step_gm = training_graph(gm).train()  # same parameters, faster graph; gm is saved
    start, last = time.perf_counter(), float("nan")
    batches = iter(loaded.train_batches())
    with click.progressbar(range(steps), label="training", file=sys.stderr,
                           show_pos=True, item_show_func=lambda _: f"loss {last:.4f}") as bar:
        for _ in bar:
            try:
                inputs, target = next(batches)
            except StopIteration:
                batches = iter(loaded.train_batches())
                inputs, target = next(batches)
            loss = loaded.loss_fn(step_gm(*inputs), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = float(loss)
    seconds = time.perf_counter() - start
    after = _evaluate(gm, loaded.eval_batches(), loaded.loss_fn) if loaded.eval_batches \
        else None
    save_adapter(gm, adapter_dir, force=True)
    report = {"steps": steps, "seconds": round(seconds, 3), "final_loss": last,
              "eval_before": before, "eval_after": after, "adapter": adapter_dir}
    if as_json:
        echo_json(report)
        return
    click.echo(f"trained {steps} steps in {seconds:.1f} s, final loss {last:.4f}")
    if before and after:
        for key in before:
            click.echo(f"held-out {key}: {before[key]:.4f} -> {after[key]:.4f}")
    click.echo(f"adapter saved to {adapter_dir}")

