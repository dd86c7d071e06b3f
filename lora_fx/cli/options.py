"""Options shared by the commands that run a model: where (``--device``) and in what
precision (``--dtype``, ``--adapter-dtype``, ``--autocast``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

device_option = click.option(
    "--device", default=None, help="Run where the weights live: cpu, cuda or cuda:N (the model "
    "is moved there before capture; default: where the model file puts it).")
dtype_option = click.option(
    "--dtype", "model_dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
    help="Cast the base model to this dtype before capture (default: as loaded).")
adapter_dtype_option = click.option(
    "--adapter-dtype", type=click.Choice(["fp32", "base"]), default="fp32", show_default=True,
    help="LoRA factors on an fp16/bf16 base: fp32 (PEFT's autocast_adapter_dtype) or the "
         "base's dtype.")
autocast_option = click.option(
    "--autocast", type=click.Choice(["bf16", "fp16"]), default=None,
    help="Run the forward under torch.autocast in this dtype (weights stay as they are).")
