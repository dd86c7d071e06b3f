"""``lorafx train``: train an adapter with the model file's batches and loss.
"""

from __future__ import annotations

import sys

import click
import torch

from ..errors import LoraFxError
from ..load.device import place, resolve_device, resolve_dtype
from ..load.model import load_model
from ..model.adapters import load_adapter, save_adapter
from ..train.loop import Placement, train
from .common import echo_json
from .options import adapter_dtype_option, autocast_option, device_option, dtype_option


@click.command("train")
@click.argument("model")
@click.option("--adapter", "adapter_dir", required=True, type=click.Path(),
              help="Adapter directory (read, trained, written back).")
@click.option("--steps", type=int, default=100, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
@device_option
@dtype_option
@adapter_dtype_option
@autocast_option
def train_command(model: str, adapter_dir: str, steps: int, lr: float, weight_decay: float,
                  seed: int, as_json: bool, device: str | None, model_dtype: str | None,
                  adapter_dtype: str, autocast: str | None) -> None:
    """Train the adapter with MODEL's train_batches() and loss_fn(), then save it back."""
    if steps < 1:
        raise LoraFxError(f"--steps {steps} must be >= 1")
    where, dtype = resolve_device(device), resolve_dtype(model_dtype)
    loaded = place(load_model(model), where, dtype)  # capture where the weights live
    if loaded.train_batches is None or loaded.loss_fn is None:
        raise LoraFxError(f"{model} defines no train_batches()/loss_fn(): add both to train "
                          "with `lorafx train`")
    torch.manual_seed(seed)
    gm = load_adapter(loaded.module, loaded.example_inputs, adapter_dir, loaded.dynamic_shapes,
                      autocast_adapter_dtype=adapter_dtype == "fp32",
                      model_names=[model, loaded.extras.get("directory", "")])
    placement = Placement(where, dtype, resolve_dtype(autocast))
    with click.progressbar(length=steps, label="training", file=sys.stderr, show_pos=True,
                           item_show_func=lambda loss: loss) as bar:
        def on_step(step: int, loss: float) -> None:
            bar.update(1, f"loss {loss:.4f}")

        report = train(gm, loaded, steps, lr, weight_decay, on_step, placement)
    save_adapter(gm, adapter_dir, force=True)
    if as_json:
        echo_json({"steps": steps, "seconds": round(report.seconds, 3),
                   "final_loss": report.final_loss, "eval_before": report.eval_before,
                   "eval_after": report.eval_after, "adapter": adapter_dir})
        return
    click.echo(f"trained {steps} steps in {report.seconds:.1f} s, final loss "
               f"{report.final_loss:.4f}")
    before, after = report.eval_before, report.eval_after
    if before and after:
        for key in before:
            click.echo(f"held-out {key}: {before[key]:.4f} -> {after[key]:.4f}")
    click.echo(f"adapter saved to {adapter_dir}")
