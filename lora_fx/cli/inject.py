"""``lorafx inject``: inject LoRA and write a fresh adapter (B = 0), or plan it (--dry-run).
"""

from __future__ import annotations

from typing import Any

import click
import torch

from ..adapter.peft import check_adapter_output
from ..config import LoraConfig
from ..errors import LoraFxError
from ..graph.state import require_state
from ..load.device import place, resolve_device, resolve_dtype
from ..load.model import load_model
from ..model.adapters import save_adapter
from ..model.inject import inject
from ..model.params import count_parameters
from ..model.plan import plan_model
from ..model.saving import base_model_name
from .common import echo_json, init_value, patterns, site_json, table
from .lists import ListCommand, ListOption
from .options import adapter_dtype_option, device_option, dtype_option
from .targets import lora_config, target_parameters_option


@click.command("inject", cls=ListCommand)
@click.argument("model")
@click.option("-t", "--target", "targets", cls=ListOption,
              help="Site names or .-suffixes, as PEFT's target_modules: -t a,b, -t a b "
                   "or -t a -t b; "
                   "'all-linear' for every linear but the output head.")
@click.option("--target-regex", help="A regex matched against the whole site name instead.")
@target_parameters_option
@click.option("-r", "--rank", "rank", type=int, default=8, show_default=True)
@click.option("--alpha", type=float, default=None, help="lora_alpha (default: the rank).")
@click.option("--dropout", type=float, default=0.0, show_default=True)
@click.option("--rslora", is_flag=True, help="Scale alpha/sqrt(r) (rsLoRA).")
@click.option("--init", "init", default="true", show_default=True,
              help="init_lora_weights: true (B=0), gaussian, false.")
@click.option("--rank-pattern", multiple=True, help="REGEX=RANK per-site rank (repeatable).")
@click.option("--alpha-pattern", multiple=True, help="REGEX=ALPHA per-site alpha (repeatable).")
@click.option("--modules-to-save", cls=ListOption,
              help="Modules trained in full (e.g. a head), as -t.")
@click.option("-o", "--output", type=click.Path(), help="Adapter directory to write.")
@click.option("--dry-run", is_flag=True, help="Plan only, on the meta device: nothing written.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
@click.option("--force", is_flag=True, help="Overwrite an existing adapter.")
@click.option("--seed", type=int, default=0, show_default=True)
@device_option
@dtype_option
@adapter_dtype_option
def inject_command(model: str, targets: tuple[str, ...], target_regex: str | None,
                   target_parameters: tuple[str, ...], rank: int,
                   alpha: float | None, dropout: float, rslora: bool, init: str,
                   rank_pattern: tuple[str, ...], alpha_pattern: tuple[str, ...],
                   modules_to_save: tuple[str, ...], output: str | None, dry_run: bool,
                   as_json: bool, force: bool, seed: int, device: str | None,
                   model_dtype: str | None, adapter_dtype: str) -> None:
    """Inject LoRA into MODEL and write a fresh adapter (B = 0) to -o DIR."""
    config = lora_config(
        targets, target_regex, target_parameters, rank, alpha, lora_dropout=dropout,
        use_rslora=rslora, init_lora_weights=init_value(init),
        rank_pattern=patterns(rank_pattern, int),
        alpha_pattern=patterns(alpha_pattern, float),
        modules_to_save=list(modules_to_save) or None,
        autocast_adapter_dtype=adapter_dtype == "fp32")
    where = None if dry_run else resolve_device(device)
    if not dry_run and not output:
        raise LoraFxError("no output: pass -o DIR (or --dry-run to only plan)")
    if output and not dry_run:
        check_adapter_output(output, force)  # before any work
    loaded = load_model(model, meta=dry_run)
    if dry_run:  # the plan `lorafx plan` makes: the model on the meta device, counts only
        report = plan_model(loaded.module, loaded.example_inputs, config, loaded.dynamic_shapes)
        _print(config, report.sites, report.trainable_params, report.total_params,
               report.saved_modules, None, as_json)
        return
    place(loaded, where, resolve_dtype(model_dtype))  # capture where the weights live
    torch.manual_seed(seed)  # after the model file ran: it may seed torch itself
    # PEFT's record: hf:DIR's DIR (config.name_or_path); a model file's spec otherwise
    config.base_model_name_or_path = base_model_name(loaded.module) or model
    gm = inject(loaded.module, loaded.example_inputs, config, loaded.dynamic_shapes)
    assert output is not None
    save_adapter(gm, output, force=force)
    state = require_state(gm)
    _print(config, list(state.sites.values()), *count_parameters(gm), state.saved, output,
           as_json)


def _print(config: LoraConfig, sites: list[Any], trainable: int, total: int,
           saved: list[str], output: str | None, as_json: bool) -> None:
    rows = [site_json(s, config) for s in sites]
    if as_json:
        echo_json({"sites": rows, "trainable_params": trainable, "total_params": total,
                   "modules_to_save": saved, "output": output})
        return
    click.echo(table(["site", "form", "in->out", "r"],
                     [[s["name"], s["form"], f"{s['in_features']}->{s['out_features']}",
                       str(s["r"])] for s in rows]))
    click.echo(f"trainable: {trainable:,} / {total:,} ({100 * trainable / total:.4f}%)")
    click.echo(f"adapter written to {output}" if output else "dry run: nothing written")
