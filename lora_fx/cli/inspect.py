"""``lorafx inspect``: every candidate site and why other linear ops are skipped.
"""

from __future__ import annotations

import click

from ..capture.trace import capture
from ..load.model import load_model
from ..match.matcher import find_sites
from ..match.peft_reach import peft_reachable
from .common import echo_json, site_rows, table


@click.command("inspect")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
@click.option("--meta", is_flag=True, help="Build the model on the meta device (no weights).")
def inspect_command(model: str, as_json: bool, meta: bool) -> None:
    """List every candidate LoRA site of MODEL and why other linear ops are skipped."""

    loaded = load_model(model, meta=meta)
    gm = capture(loaded.module, loaded.example_inputs, loaded.dynamic_shapes)
    sites, skips = find_sites(gm)
    data = {
        "capture": gm.meta.get("lorafx_capture"),
        "sites": [{"name": s.name, "form": s.form, "layout": s.layout,
                   "in_features": s.in_features, "out_features": s.out_features,
                   "kind": s.kind, "experts": s.experts, "peft": peft_reachable(s)}
                  for s in sites],
        "skipped": [{"name": k.name, "form": k.form, "reason": k.reason} for k in skips],
    }
    if as_json:
        echo_json(data)
        return
    click.echo(f"captured with {data['capture']}: {len(sites)} sites, {len(skips)} skipped")
    experts = any(s.experts for s in sites)  # a column only for MoE models: E per expert site
    rows = [row + ([str(s.experts or "")] if experts else []) + [
        "yes" if peft_reachable(s) else "no"] for row, s in zip(site_rows(sites), sites,
                                                                 strict=True)]
    header = ["site", "form", "in->out"] + (["experts"] if experts else []) + ["peft"]
    click.echo(table(header, rows))  # peft: PEFT can reach it too
    if skips:
        click.echo("\nskipped:")
        click.echo(table(["op", "form", "reason"], [[k.name, k.form, k.reason] for k in skips]))

