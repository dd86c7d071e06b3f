"""The ``lorafx`` command line: a thin click layer over the library.

Errors are one line on stderr and a non-zero exit; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import click

from .errors import LoraFxError, LoraFxWarning
from .fileio import check_writable_dir

F = TypeVar("F", bound=Callable[..., Any])


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def _init_value(text: str) -> bool | str:
    low = text.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    return low


def _patterns(items: Iterable[str], kind: type) -> dict[str, Any]:
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and library warnings.")
@click.version_option(package_name="lorafx")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """lorafx: LoRA as a compiler pass (capture, inject, train, merge, export ONNX).

    MODEL is path/to/model.py[:factory] (runs that file's code: only use files you trust)
    or a plugin spec such as hf:DIR.
    """
    ctx.obj = {"debug": debug}


def _site_rows(sites: list[Any], ranks: dict[str, int] | None = None) -> list[list[str]]:
    rows = []
    for s in sites:
        row = [s.name, s.form, f"{s.in_features}->{s.out_features}"]
        if ranks is not None:
            row.append(str(ranks.get(s.name, "")))
        rows.append(row)
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
@click.option("--meta", is_flag=True, help="Build the model on the meta device (no weights).")
def inspect(model: str, as_json: bool, meta: bool) -> None:
    """List every candidate LoRA site of MODEL and why other linear ops are skipped."""
    from .capture import capture
    from .load import load_model
    from .patterns import find_sites, peft_reachable

    loaded = load_model(model, meta=meta)
    gm = capture(loaded.module, loaded.example_inputs, loaded.dynamic_shapes)
    sites, skips = find_sites(gm)
    data = {
        "capture": gm.meta.get("lorafx_capture"),
        "sites": [{"name": s.name, "form": s.form, "layout": s.layout,
                   "in_features": s.in_features, "out_features": s.out_features,
                   "kind": s.kind, "peft": peft_reachable(s)} for s in sites],
        "skipped": [{"name": k.name, "form": k.form, "reason": k.reason} for k in skips],
    }
    if as_json:
        _echo_json(data)
        return
    click.echo(f"captured with {data['capture']}: {len(sites)} sites, {len(skips)} skipped")
    click.echo(_table(["site", "form", "in->out", "peft"], [  # peft: PEFT can reach it too
        row + ["yes" if peft_reachable(s) else "no"] for row, s in zip(_site_rows(sites), sites,
                                                                        strict=True)]))
    if skips:
        click.echo("\nskipped:")
        click.echo(_table(["op", "form", "reason"], [[k.name, k.form, k.reason] for k in skips]))


@cli.command()
@click.argument("model")
@click.option("-t", "--target", "targets", multiple=True,
              help="Site name or .-suffix (repeatable), as PEFT's target_modules; "
                   "'all-linear' for every linear but the output head.")
@click.option("--target-regex", help="A regex matched against the whole site name instead.")
@click.option("-r", "--rank", "rank", type=int, default=8, show_default=True)
@click.option("--alpha", type=float, default=None, help="lora_alpha (default: the rank).")
@click.option("--dropout", type=float, default=0.0, show_default=True)
@click.option("--rslora", is_flag=True, help="Scale alpha/sqrt(r) (rsLoRA).")
@click.option("--init", "init", default="true", show_default=True,
              help="init_lora_weights: true (B=0), gaussian, false.")
@click.option("--rank-pattern", multiple=True, help="REGEX=RANK per-site rank (repeatable).")
@click.option("--alpha-pattern", multiple=True, help="REGEX=ALPHA per-site alpha (repeatable).")
@click.option("--modules-to-save", multiple=True, help="Module trained in full (e.g. a head).")
@click.option("-o", "--output", type=click.Path(), help="Adapter directory to write.")
@click.option("--dry-run", is_flag=True, help="Plan only, on the meta device: nothing written.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
@click.option("--force", is_flag=True, help="Overwrite an existing adapter.")
@click.option("--seed", type=int, default=0, show_default=True)
def inject(model: str, targets: tuple[str, ...], target_regex: str | None, rank: int,
           alpha: float | None, dropout: float, rslora: bool, init: str,
           rank_pattern: tuple[str, ...], alpha_pattern: tuple[str, ...],
           modules_to_save: tuple[str, ...], output: str | None, dry_run: bool, as_json: bool,
           force: bool, seed: int) -> None:
    """Inject LoRA into MODEL and write a fresh adapter (B = 0) to -o DIR."""
    import torch

    from . import api
    from .adapters import WEIGHTS_NAME
    from .config import LoraConfig
    from .load import load_model

    if not targets and not target_regex:
        raise LoraFxError("no target: pass -t NAME (repeatable) or --target-regex REGEX")
    if not dry_run and not output:
        raise LoraFxError("no output: pass -o DIR (or --dry-run to only plan)")
    if output and not dry_run and (Path(output) / WEIGHTS_NAME).exists() and not force:
        raise LoraFxError(f"{output} already holds an adapter: pass --force to overwrite it")
    if output and not dry_run:
        check_writable_dir(Path(output).parent.resolve())
    config = LoraConfig(
        r=rank, lora_alpha=alpha if alpha is not None else rank,
        target_modules=target_regex if target_regex else (
            "all-linear" if targets == ("all-linear",) else list(targets)),
        lora_dropout=dropout, use_rslora=rslora, init_lora_weights=_init_value(init),
        rank_pattern=_patterns(rank_pattern, int), alpha_pattern=_patterns(alpha_pattern, float),
        modules_to_save=list(modules_to_save) or None)
    loaded = load_model(model, meta=dry_run)
    torch.manual_seed(seed)  # after the model file ran: it may seed torch itself
    gm = api.inject(loaded.module, loaded.example_inputs, config, loaded.dynamic_shapes)
    trainable, total = api.count_parameters(gm)
    state = api.require_state(gm)
    sites: list[dict[str, Any]] = [
        {"name": s.name, "form": s.form, "layout": s.layout, "in_features": s.in_features,
         "out_features": s.out_features, "r": config.rank_for(s.name),
         "scale": config.scale_for(s.name)} for s in state.sites.values()]
    if not dry_run:
        assert output is not None
        config.base_model_name_or_path = config.base_model_name_or_path or model
        api.save_adapter(gm, output, force=force)
    if as_json:
        _echo_json({"sites": sites, "trainable_params": trainable, "total_params": total,
                    "modules_to_save": state.saved, "output": None if dry_run else output})
        return
    click.echo(_table(["site", "form", "in->out", "r"],
                      [[s["name"], s["form"], f"{s['in_features']}->{s['out_features']}",
                        str(s["r"])] for s in sites]))
    click.echo(f"trainable: {trainable:,} / {total:,} ({100 * trainable / total:.4f}%)")
    click.echo("dry run: nothing written" if dry_run else f"adapter written to {output}")


def _evaluate(gm: Any, batches: Iterable[Any], loss_fn: Any) -> dict[str, float]:
    """Mean loss and, for integer class targets, accuracy."""
    import torch

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


@cli.command()
@click.argument("model")
@click.option("--adapter", "adapter_dir", required=True, type=click.Path(),
              help="Adapter directory (read, trained, written back).")
@click.option("--steps", type=int, default=100, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
def train(model: str, adapter_dir: str, steps: int, lr: float, weight_decay: float, seed: int,
          as_json: bool) -> None:
    """Train the adapter with MODEL's train_batches() and loss_fn(), then save it back."""
    import torch

    from . import api
    from .fast import training_graph
    from .load import load_model

    if steps < 1:
        raise LoraFxError(f"--steps {steps} must be >= 1")
    loaded = load_model(model)
    if loaded.train_batches is None or loaded.loss_fn is None:
        raise LoraFxError(f"{model} defines no train_batches()/loss_fn(): add both to train "
                          "with `lorafx train`")
    torch.manual_seed(seed)
    gm = api.load_adapter(loaded.module, loaded.example_inputs, adapter_dir,
                          loaded.dynamic_shapes)
    before = _evaluate(gm, loaded.eval_batches(), loaded.loss_fn) if loaded.eval_batches \
        else None
    params = api.lora_parameters(gm)
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
    api.save_adapter(gm, adapter_dir, force=True)
    report = {"steps": steps, "seconds": round(seconds, 3), "final_loss": last,
              "eval_before": before, "eval_after": after, "adapter": adapter_dir}
    if as_json:
        _echo_json(report)
        return
    click.echo(f"trained {steps} steps in {seconds:.1f} s, final loss {last:.4f}")
    if before and after:
        for key in before:
            click.echo(f"held-out {key}: {before[key]:.4f} -> {after[key]:.4f}")
    click.echo(f"adapter saved to {adapter_dir}")


@cli.command()
@click.argument("model")
@click.option("--adapter", "adapter_dir", type=click.Path(), help="Adapter directory.")
@click.option("--merge/--no-merge", default=True, show_default=True,
              help="Fold the adapter into the weights, or keep the branches.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output .onnx file.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare ONNX Runtime with PyTorch on the example inputs (atol 1e-4).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32",
              show_default=True, help="Weight precision: merged in fp32, cast once; the error "
                                      "against fp32 is reported.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
def export(model: str, adapter_dir: str | None, merge: bool, output: str, opset: int | None,
           verify: bool, dtype: str, as_json: bool) -> None:
    """Export MODEL (with --adapter: merged or not) to ONNX."""
    from . import api
    from .capture import capture
    from .load import load_model
    from .onnx_export import export_onnx

    check_writable_dir(Path(output).parent.resolve())
    loaded = load_model(model)
    if adapter_dir:
        gm = api.load_adapter(loaded.module, loaded.example_inputs, adapter_dir,
                              loaded.dynamic_shapes)
    else:
        gm = capture(loaded.module, loaded.example_inputs, loaded.dynamic_shapes)
    gm.eval()
    report = export_onnx(gm, loaded.example_inputs, output, merge=merge, opset=opset,
                         verify=verify, dynamic_shapes=loaded.dynamic_shapes, dtype=dtype,
                         model=loaded.module, release=True)  # this process is done with it
    data: dict[str, Any] = {"output": str(report.path), "merged": bool(adapter_dir) and merge,
            "seconds": round(report.seconds, 3), "external_data": report.external_data,
            "nodes": sum(report.op_histogram.values()), "op_histogram": report.op_histogram,
            "max_abs_diff": report.max_abs_diff, "provider": report.provider,
            "bytes": os.path.getsize(report.path)}
    data.update({**report.extras, "dtype": dtype})
    if as_json:
        _echo_json(data)
        return
    kind = "base model" if not adapter_dir else ("merged" if merge else "unmerged")
    click.echo(f"wrote {output} ({kind}, {data['nodes']} nodes, {data['bytes'] / 1e6:.1f} MB) "
               f"in {report.seconds:.1f} s")
    if report.max_abs_diff is not None:
        click.echo(f"verified: max |ONNX Runtime - PyTorch| = {report.max_abs_diff:.3g} "
                   f"on {report.provider}")
    if "error_vs_fp32" in report.extras:
        errors = ", ".join(f"{k} {v:.3g}" for k, v in report.extras["error_vs_fp32"].items())
        click.echo(f"{dtype} error against fp32 (max abs): {errors}")


def _register_commands() -> None:
    """Commands that live in lora_fx/commands/ (each imports the library lazily)."""
    from .commands.analysis import analyze, combine, resize
    from .commands.deploy import convert_adapter, run
    from .commands.scale import plan

    for command in (analyze, resize, combine, convert_adapter, run, plan):
        cli.add_command(command)


_register_commands()


def _show_warning(message: Warning | str, category: type[Warning], *args: Any,
                  **kwargs: Any) -> None:
    click.echo(f"warning: {message}", err=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning LoraFxError into one line on stderr and exit 1."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    if not debug:
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("always", category=LoraFxWarning)
        warnings.showwarning = _show_warning
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        for name in ("torch", "torch.onnx", "torch.export", "transformers"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        cli.main(args=args, prog_name="lorafx", standalone_mode=False)
    except LoraFxError as err:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        click.echo(f"error: {err.format_message()}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted; nothing half-written was left", err=True)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 - never show users a traceback without --debug
        if debug:
            traceback.print_exc()
        msg = " ".join(str(err).split())[:300]
        click.echo(f"error: internal error {type(err).__name__}: {msg} (rerun with --debug and "
                   "report it)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
