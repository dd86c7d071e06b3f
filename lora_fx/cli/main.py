"""The ``lorafx`` group and entry point: commands load on first use, errors become one line.

Each command lives in its own module (``lora_fx.cli.<command>``) and is imported only when it
runs (click's lazy-group pattern), so ``lorafx --help`` does not import torch or onnx.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
import warnings
from typing import Any

import click

from .. import progress
from ..errors import LoraFxError, LoraFxWarning

COMMANDS = {  # name -> "module:function", in the order `lorafx --help` lists them
    "inspect": "inspect:inspect_command", "plan": "plan:plan_command",
    "inject": "inject:inject_command", "train": "train:train_command",
    "export": "export:export_command", "convert-adapter": "deploy:convert_adapter_command",
    "run": "deploy:run_command", "analyze": "analysis:analyze_command",
    "resize": "analysis:resize_command", "combine": "analysis:combine_command",
    "generate": "generate:generate_command",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported from ``COMMANDS`` when first used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, _, attr = COMMANDS[cmd_name].partition(":")
        command = getattr(importlib.import_module(f"{__package__}.{module}"), attr)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and library warnings.")
@click.version_option(package_name="lorafx")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """lorafx: LoRA as a compiler pass (capture, inject, train, merge, export ONNX).

    MODEL is path/to/model.py[:factory] (runs that file's code: only use files you trust)
    or a plugin spec such as hf:DIR.
    """
    ctx.obj = {"debug": debug}


def _show_warning(message: Warning | str, category: type[Warning], *args: Any,
                  **kwargs: Any) -> None:
    progress.clear()  # not in the middle of a spinner's line
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
    progress.enable(sys.stderr.isatty() and "--json" not in args)  # a spinner on terminals
    try:
        cli.main(args=args, prog_name="lorafx", standalone_mode=False)
    except LoraFxError as err:
        if debug:
            traceback.print_exc()
        progress.clear()
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

