"""Train a lorafx-injected model inside Hugging Face's ``Trainer``; the adapter is what it saves.

::

    loaded = lora_fx.load.load_model("hf:path/to/model")
    gm = lora_fx.inject(loaded.module, loaded.example_inputs, cfg, loaded.dynamic_shapes)
    trainer = LorafxTrainer(gm, TrainingArguments(...), train_dataset=ds,
                            loss_fn=loaded.loss_fn, input_names=loaded.extras["input_names"],
                            adapter_dir="adapter")
    trainer.train()            # at the end: adapter/ in PEFT's layout

Trainer's batches are dicts; the graph takes positional arguments, so a batch is fed as
``gm(*[batch.get(n) for n in input_names])`` (absent keys → None) and the loss is
``loss_fn(output, batch["labels"])``, a per-batch mean. Only A, B (and modules_to_save copies)
train, because inject froze the rest. ``save_model`` and every checkpoint write the adapter
(``adapter_config.json`` + ``adapter_model.safetensors``), never the frozen base, so
``PeftModel.from_pretrained(base, dir)`` and ``lora_fx.load_adapter`` read them; resuming from a
checkpoint and ``load_best_model_at_end`` read the adapter back.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter.peft import WEIGHTS_NAME, read_adapter
from ..errors import LoraFxError
from ..graph.state import require_state
from ..model.adapters import by_site, load_weights, save_adapter
from ..model.params import branches

try:
    from transformers import Trainer, TrainerCallback
except ImportError as err:  # pragma: no cover - transformers is an optional dependency
    raise LoraFxError("lora_fx.train.hf_trainer needs transformers' Trainer: pip install "
                      "'lorafx[hf]' accelerate") from err

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


def graph_input_names(model: nn.Module) -> list[str]:
    """The positional parameter names of the graph's own forward (a LoraModel's
    ``graph_forward``: the inputs it was captured with), else of ``model.forward``."""
    params = inspect.signature(getattr(model, "graph_forward", model.forward)).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds]


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    """Copy the adapter in ``directory`` (A and B per site, DoRA magnitudes, modules_to_save
    tensors) into ``model``, an injected GraphModule with the same sites."""
    adapter = by_site(model, read_adapter(directory))
    found = branches(model)
    if set(adapter.lora) != set(found):
        odd = sorted(set(adapter.lora) ^ set(found))[0]
        raise LoraFxError(f"{directory}: site {odd!r} is in only one of the adapter and the "
                          "model: resume with the model the checkpoint was trained on")
    load_weights(model, adapter, str(directory))


class SaveAdapterCallback(TrainerCallback):  # type: ignore[misc]
    """At the end of training, write the model's adapter to ``directory`` (PEFT's layout)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def on_train_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                     **kwargs: Any) -> None:
        if model is not None and args.should_save:
            save_adapter(_unwrap(model), self.directory, force=True)


def _unwrap(model: Any) -> nn.Module:
    """The injected GraphModule under DDP / accelerate wrappers."""
    while not hasattr(model, "meta") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    if not isinstance(model, nn.Module):
        raise LoraFxError("LorafxTrainer has no model: pass the GraphModule from lora_fx.inject")
    return model


class LorafxTrainer(Trainer):  # type: ignore[misc]
    """``transformers.Trainer`` for a GraphModule returned by ``lora_fx.inject``.

    ``loss_fn(output, labels)`` computes the loss (``LoadedModel.loss_fn`` for ``hf:`` models,
    or ``lora_fx.plugins.hf.causal_lm_loss`` and friends); ``input_names`` orders the batch keys
    as the graph's positional inputs (default: the graph's own parameter names);
    ``adapter_dir``, when given, receives the adapter when training ends.
    """

    loss_is_scaled_for_ga = False  # loss_fn returns a per-batch mean

    def __init__(self, model: nn.Module, args: Any = None, *, loss_fn: LossFn | None = None,
                 input_names: Sequence[str] | None = None, label_name: str = "labels",
                 adapter_dir: str | Path | None = None, **kwargs: Any) -> None:
        require_state(model)
        if loss_fn is None:
            raise LoraFxError("LorafxTrainer needs loss_fn(output, labels): pass "
                              "LoadedModel.loss_fn or e.g. lora_fx.plugins.hf.causal_lm_loss")
        self.loss_fn = loss_fn
        self.input_names = list(input_names) if input_names else graph_input_names(model)
        self.label_name = label_name
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if adapter_dir is not None:
            callbacks.append(SaveAdapterCallback(adapter_dir))
        super().__init__(model=model, args=args, callbacks=callbacks, **kwargs)
        self.model_accepts_loss_kwargs = False
        if self.args.label_names is None:
            self.label_names = [label_name]
        self.can_return_loss = True

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any],
                     return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """loss = loss_fn(model(*inputs in input_names order), inputs[label_name])."""
        labels = inputs.get(self.label_name)
        if labels is None:
            raise LoraFxError(f"the batch has no {self.label_name!r} (keys: "
                              f"{', '.join(sorted(inputs))}): add labels in the dataset or "
                              "collator, or pass label_name=")
        outputs = model(*[inputs.get(name) for name in self.input_names])
        loss = self.loss_fn(outputs, labels)
        if not return_outputs:
            return loss
        return loss, ({"logits": outputs} if isinstance(outputs, torch.Tensor) else outputs)

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        """Write the adapter (not the frozen base) to ``output_dir``."""
        out = Path(output_dir if output_dir is not None else str(self.args.output_dir))
        if not self.args.should_save:
            return
        out.mkdir(parents=True, exist_ok=True)
        save_adapter(_unwrap(self.model), out, force=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(out))

    def _load_from_checkpoint(self, resume_from_checkpoint: str,
                              model: nn.Module | None = None) -> None:
        load_adapter_weights(_unwrap(model or self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best and (Path(best) / WEIGHTS_NAME).exists():
            load_adapter_weights(_unwrap(self.model), best)
