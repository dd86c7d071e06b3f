"""Shared pieces of the command line: JSON and table output, option parsing.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from typing import Any

import click

from ..config import LoraConfig
from ..errors import LoraFxError
from ..onnx.limits import Check
from ..onnx.survival import Survival


def verified_line(checks: Sequence[Check], provider: str | None, note: str = "") -> str:
    """One line for a verified export: the worst case against its limit, the limit's basis,
    each case's error and the adapter's own effect (where a case ran one)."""
    worst = max(checks, key=lambda c: c.error / c.limit if c.limit else 0.0)
    cases = ", ".join(f"{c.name} {c.max_abs_diff:.3g}" for c in checks)
    effects = [c.effect for c in checks if c.effect is not None]
    moved = f"; the adapter moves outputs by up to {max(effects):.3g}" if effects else ""
    if effects and not max(effects):
        moved = "; the adapter changes no output (B = 0: not trained yet)"
    elif any(c.blind for c in checks):
        moved += ", within the limit: a file without the adapter would pass too"
    if worst.relative is not None:
        return (f"verified: |ONNX Runtime - PyTorch| / |PyTorch| = {worst.relative:.3g} on "
                f"{provider} (max abs {cases}; limit {worst.limit:g} = {worst.basis}{note}"
                f"{moved})")
    return (f"verified: max |ONNX Runtime - PyTorch| = {worst.max_abs_diff:.3g} on {provider} "
            f"({cases}; limit {worst.limit:.3g} = {worst.basis}{note}{moved})")


def survival_json(survival: Survival | None) -> dict[str, Any] | None:
    return None if survival is None else dataclasses.asdict(survival)


def echo_survival(survival: Survival | None) -> None:
    """A merged int4/int8 file's adapter report on stdout where it survived (a lost adapter is
    a warning on stderr, naming --no-merge)."""
    if survival is not None and not survival.lost:
        click.echo(survival.message)


def checks_json(checks: Sequence[Check]) -> list[dict[str, Any]]:
    return [{**dataclasses.asdict(c), "ok": c.ok} for c in checks]


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def init_value(text: str) -> bool | str:
    low = text.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    return low


def patterns(items: Iterable[str], kind: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.rpartition("=")
        if not sep or not key:
            raise LoraFxError(f"pattern {item!r} must look like REGEX=VALUE")
        try:
            out[key] = kind(value)
        except ValueError as err:
            raise LoraFxError(f"pattern {item!r}: {value!r} is not a valid {kind.__name__}"
                              ) from err
    return out


def site_rows(sites: list[Any], ranks: dict[str, int] | None = None) -> list[list[str]]:
    rows = []
    for s in sites:
        row = [s.name, s.form, f"{s.in_features}->{s.out_features}"]
        if ranks is not None:
            row.append(str(ranks.get(s.name, "")))
        rows.append(row)
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)



def target_config(targets: tuple[str, ...], target_regex: str | None, rank: int,
                  alpha: float | None, **fields: Any) -> LoraConfig:
    """The LoraConfig of ``-t``/``--target-regex``/``-r``/``--alpha`` (alpha defaults to r;
    ``-t all-linear`` is PEFT's "all-linear"), plus other LoraConfig ``fields``."""
    if not targets and not target_regex:
        raise LoraFxError("no target: pass -t NAME (repeatable) or --target-regex REGEX")
    wanted: str | list[str] = target_regex if target_regex else (
        "all-linear" if targets == ("all-linear",) else list(targets))
    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                      target_modules=wanted, **fields)


def site_json(site: Any, config: LoraConfig) -> dict[str, Any]:
    """One site's row of ``inject``/``plan`` output: a matched Site or a planned one."""
    return {"name": site.name, "form": site.form, "layout": site.layout,
            "in_features": site.in_features, "out_features": site.out_features,
            "r": config.rank_for(site.name), "scale": config.scale_for(site.name)}
