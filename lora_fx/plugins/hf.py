"""Built-in plugin ``hf:DIR``: a Hugging Face model saved with ``save_pretrained`` as a MODEL.

- Class: ``config.architectures[0]`` from ``transformers`` (task heads included), else
  ``AutoModel``; loaded offline (``local_files_only``), never running repository code.
- ``use_cache=False`` (export cannot return cache objects). Attention: "eager" for the model
  types whose SDPA path does not export (the T5 family: a view of a transposed tensor), "sdpa"
  where the class supports it, else "eager".
- Example inputs from the config: ``input_ids`` + ``attention_mask`` [batch 2, seq 8] for text
  (+ ``token_type_ids``, zeros, where the config has segment types: BERT), plus
  ``decoder_input_ids`` [2, 6] for encoder-decoders; ``pixel_values`` [2, C, H, W] for
  vision. They are passed positionally in ``forward``'s order, ``None`` for skipped parameters
  (``GPT2LMHeadModel(input_ids, None, attention_mask)``).
- ``dynamic_shapes``: ``Dim.AUTO`` on the batch and sequence axes (image: batch only); export
  keeps an axis dynamic where the model allows it and specializes it otherwise.
- ``loss_fn(output, labels)`` for task heads (see :func:`task_loss`), for ``lorafx train`` and
  the Trainer integration.
- ``meta=True`` builds the model from its config on the meta device: no weight is read.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LoraFxError, LoraFxWarning
from ..load.model import LoadedModel

BATCH, SEQ, DECODER_SEQ = 2, 8, 6
EAGER_TYPES = frozenset({"t5", "mt5", "umt5", "longt5", "switch_transformers"})
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


class HfPlugin:
    """The ``hf`` entry point of group ``lorafx.plugins``: ``hf:DIR``."""

    def load(self, arg: str, meta: bool = False) -> LoadedModel:
        return load_pretrained(arg, meta=meta)


plugin = HfPlugin()


def load_pretrained(directory: str | Path, meta: bool = False, batch: int = BATCH,
                    seq: int = SEQ) -> LoadedModel:
    """Load a ``save_pretrained`` directory with example inputs made from its config."""
    d = Path(directory).expanduser()
    where = f"hf:{directory}"
    if not (d / "config.json").is_file():
        raise LoraFxError(f"{where}: no config.json in {d}: pass a directory written by "
                          "save_pretrained (hf:path/to/dir)")
    with _quiet():
        config = _config(d, where)
        cls = model_class(config, where)
        attn = attention_for(config, cls)
        disable_cache(config)
        model = _build(cls, config, d, attn, meta, where)
    kwargs = example_kwargs(model, config, batch, seq, where)
    if meta:
        kwargs = {k: v.to("meta") for k, v in kwargs.items()}
    args, names = positional(model, kwargs, where)
    return LoadedModel(
        module=model, example_inputs=args, dynamic_shapes=dynamic_shapes(names, args),
        loss_fn=task_loss(cls.__name__, config), name=d.resolve().name,
        extras={"input_names": names, "architecture": cls.__name__, "attn_implementation": attn,
                "config": config, "directory": str(d)})


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers without progress bars and below-error logs; restored afterwards."""
    from transformers.utils import logging as hf_logging

    bar, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def _config(d: Path, where: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LoraFxError(f"{where}: cannot read config.json ({first}): upgrade transformers "
                          "or write a model.py that builds the model") from err


def model_class(config: Any, where: str = "hf") -> type[nn.Module]:
    """The class named by ``config.architectures[0]`` (task head included), else AutoModel's."""
    import transformers

    names = list(getattr(config, "architectures", None) or [])
    if not names:
        try:
            return transformers.AutoModel._model_mapping[type(config)]  # type: ignore
        except KeyError as err:
            raise LoraFxError(f"{where}: config.json names no architecture and model_type "
                              f"{config.model_type!r} has no AutoModel class: write a model.py"
                              ) from err
    cls = getattr(transformers, names[0], None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        custom = " (custom code, which lorafx never runs)" if getattr(
            config, "auto_map", None) else ""
        raise LoraFxError(f"{where}: architecture {names[0]!r} is not a transformers class"
                          f"{custom}: write a model.py that builds it")
    return cls


def attention_for(config: Any, cls: type[nn.Module]) -> str:
    """An attention implementation that torch.export and the ONNX exporter accept."""
    if getattr(config, "model_type", "") in EAGER_TYPES:
        return "eager"
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"


def disable_cache(config: Any) -> None:
    """``use_cache=False`` on the config and its text config: no cache objects in outputs."""
    configs = [config]
    with contextlib.suppress(Exception):
        configs.append(config.get_text_config())
    for c in configs:
        c.use_cache = False


def _build(cls: Any, config: Any, d: Path, attn: str, meta: bool, where: str) -> nn.Module:
    if meta:
        with torch.device("meta"):
            return cls._from_config(config, attn_implementation=attn).eval()  # type: ignore
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, info = cls.from_pretrained(str(d), config=config, local_files_only=True,
                                              attn_implementation=attn,
                                              output_loading_info=True)
    except Exception as err:  # noqa: BLE001 - safetensors, torch and transformers all raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LoraFxError(f"{where}: cannot load the weights ({type(err).__name__}: {first}): "
                          "save the model again with save_pretrained") from err
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        warnings.warn(f"{where}: {len(missing)} weights are not in the checkpoint and were "
                      f"initialized randomly ({', '.join(missing[:3])}...)", LoraFxWarning,
                      stacklevel=3)
    return model.eval()  # type: ignore[no-any-return]


def example_kwargs(model: nn.Module, config: Any, batch: int = BATCH, seq: int = SEQ,
                   where: str = "hf") -> dict[str, torch.Tensor]:
    """Example inputs for ``model`` by keyword, made from its config (seeded, on the CPU)."""
    main = getattr(model, "main_input_name", "input_ids")
    g = torch.Generator().manual_seed(0)
    if main == "pixel_values":
        vision = getattr(config, "vision_config", None) or config
        size = getattr(vision, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        channels = getattr(vision, "num_channels", 3)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()),
                     torch.float32)  # a bf16 checkpoint takes bf16 pixels
        return {"pixel_values": torch.randn(batch, channels, h, w, generator=g).to(dtype)}
    if main != "input_ids":
        raise LoraFxError(f"{where}: {type(model).__name__} takes {main!r}; the hf plugin makes "
                          "example inputs for input_ids and pixel_values models only: write a "
                          "model.py with example_inputs()")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    seq = min(seq, max(2, max_positions(text) - 2))
    out = {"input_ids": _token_ids(text, batch, seq, g),
           "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    if takes_token_types(model, text):  # BERT and kin: an input of the export, as optimum's
        out["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    if getattr(config, "is_encoder_decoder", False):
        out["decoder_input_ids"] = _token_ids(text, batch, min(DECODER_SEQ, seq), g)
    return out


def takes_token_types(model: nn.Module, text: Any) -> bool:
    """Whether ``model`` reads segment ids: its forward takes ``token_type_ids`` and its
    config has a segment vocabulary of 2 or more (BERT's ``type_vocab_size``)."""
    params = inspect.signature(model.forward).parameters
    return "token_type_ids" in params and int(getattr(text, "type_vocab_size", 0) or 0) > 1


def max_positions(config: Any) -> int:
    """A transformers config's context length: ``max_position_embeddings`` (GPT-2's
    ``n_positions``, others' ``max_seq_len`` / ``seq_length``); 65536 where none is given."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 16


def _token_ids(text: Any, batch: int, seq: int, g: torch.Generator) -> torch.Tensor:
    """Random ids in [0, vocab), avoiding the pad token (RoBERTa derives positions from it)."""
    vocab = int(text.vocab_size)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    pad = getattr(text, "pad_token_id", None)
    if isinstance(pad, int) and 0 <= pad < vocab and vocab > 1:
        ids[ids == pad] = (pad + 1) % vocab
    return ids


def positional(model: nn.Module, kwargs: Mapping[str, torch.Tensor],
               where: str = "hf") -> tuple[tuple[torch.Tensor | None, ...], list[str]]:
    """``kwargs`` as positional arguments of ``model.forward``, ``None`` for the gaps.

    Returns the arguments and the parameter names they fill, in order.
    """
    params = inspect.signature(model.forward).parameters
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [n for n, p in params.items() if p.kind in kinds]
    for key in kwargs:
        if key not in names:
            raise LoraFxError(f"{where}: {type(model).__name__}.forward has no positional "
                              f"parameter {key!r}: write a model.py with example_inputs()")
    last = max(names.index(k) for k in kwargs)
    used = names[: last + 1]
    for name in used:
        if name not in kwargs and params[name].default is not None:
            raise LoraFxError(f"{where}: {type(model).__name__}.forward needs {name!r} before "
                              f"{list(kwargs)[-1]!r}: write a model.py with example_inputs()")
    return tuple(kwargs.get(n) for n in used), used


def dynamic_shapes(names: list[str], args: tuple[torch.Tensor | None, ...]) -> tuple[Any, ...]:
    """``Dim.AUTO`` on batch and sequence axes (images: batch), ``None`` for absent inputs."""
    auto = torch.export.Dim.AUTO
    out: list[Any] = []
    for name, arg in zip(names, args, strict=True):
        if arg is None:
            out.append(None)
        elif name == "pixel_values":
            out.append({0: auto})
        else:
            out.append({i: auto for i in range(min(arg.dim(), 2))})
    return tuple(out)


# --- task losses: loss_fn(output, labels) ---------------------------------------------------

def logits_of(output: Any) -> torch.Tensor:
    """``output.logits`` of a ModelOutput (or dict), else the first element or the tensor."""
    if isinstance(output, Mapping):
        return output["logits"]  # type: ignore[no-any-return]
    if isinstance(output, (tuple, list)):
        return output[0]  # type: ignore[no-any-return]
    return output  # type: ignore[no-any-return]


def causal_lm_loss(output: Any, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: mean over t of -log p(labels[t+1] | logits[t]), -100 ignored."""
    logits = logits_of(output)[:, :-1].float()
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def token_loss(output: Any, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy (masked LM, token classification, seq2seq), -100 ignored."""
    logits = logits_of(output).float()
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100)


def classification_loss(output: Any, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the class logits [batch, classes] against integer labels [batch]."""
    return F.cross_entropy(logits_of(output).float(), labels)


def regression_loss(output: Any, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the single logit (num_labels == 1) against float labels."""
    return F.mse_loss(logits_of(output).float().squeeze(-1), labels.float())


def task_loss(architecture: str, config: Any = None) -> LossFn | None:
    """The loss of a transformers task head, by class name; None for a bare backbone."""
    if architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return causal_lm_loss
    if architecture.endswith(("ForSequenceClassification", "ForImageClassification",
                              "ForAudioClassification")):
        return regression_loss if getattr(config, "num_labels", 2) == 1 else classification_loss
    if architecture.endswith(("ForTokenClassification", "ForMaskedLM",
                              "ForConditionalGeneration", "ForSeq2SeqLM")):
        return token_loss
    return None
