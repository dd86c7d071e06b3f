"""``lorafx plan``: sites and exact parameter counts of a LoRA on the meta device.

The library is imported inside the command so that ``lorafx --help`` stays fast.
"""

from __future__ import annotations

import json

import click

from ..model.plan import plan_spec
from .lists import ListCommand, ListOption
from .targets import lora_config, target_parameters_option


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} P{unit}"


@click.command("plan", cls=ListCommand)
@click.argument("model")
@click.option("-t", "--target", "targets", cls=ListOption,
              help="Site names or .-suffixes, as PEFT's target_modules: -t a,b, -t a b "
                   "or -t a -t b.")
@click.option("--target-regex", help="A regex matched against the whole site name instead.")
@target_parameters_option
@click.option("-r", "--rank", type=int, default=8, show_default=True)
@click.option("--alpha", type=float, default=None, help="lora_alpha (default: the rank).")
@click.option("--modules-to-save", cls=ListOption,
              help="Modules trained in full (e.g. a head), as -t.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
def plan_command(model: str, targets: tuple[str, ...], target_regex: str | None,
                 target_parameters: tuple[str, ...], rank: int, alpha: float | None,
                 modules_to_save: tuple[str, ...], as_json: bool) -> None:
    """Plan a LoRA on MODEL built on the meta device: no weight is allocated.

    Prints the sites, trainable / total parameters (as PEFT counts them), the adapter's size in
    fp16 and fp32, and this run's time and peak memory.
    """
    config = lora_config(targets, target_regex, target_parameters, rank, alpha,
                         modules_to_save=list(modules_to_save) or None)
    report, measured = plan_spec(model, config)
    if as_json:
        click.echo(json.dumps({**report.to_json(), **measured}, indent=2))
        return
    click.echo(f"captured with {report.capture}: {len(report.sites)} sites, "
               f"{len(report.skipped)} other linear ops")
    shown = report.sites[:8]
    for s in shown:
        click.echo(f"  {s.name}  {s.in_features}->{s.out_features}  r={s.r}  {s.params:,}")
    if len(report.sites) > len(shown):
        click.echo(f"  ... {len(report.sites) - len(shown)} more")
    trainable, total = report.trainable_params, report.total_params
    click.echo(f"trainable: {trainable:,} / {total:,} ({100 * trainable / total:.4f}%)")
    click.echo(f"adapter: {_human(report.adapter_bytes())} in fp16; base weights: "
               f"{_human(2 * (total - trainable))} in fp16")
    click.echo(f"planned in {measured['load_s'] + measured['plan_s']:.1f} s, peak memory "
               f"{_human(measured['peak_rss_bytes'])}")
