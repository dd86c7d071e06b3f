"""A decoder with its KV cache as flat tensors, in ONNX Runtime GenAI's names and layout.

For a decoder of L layers, S new tokens after P cached ones (P = 0: the prefill):

    logits, K'_0, V'_0, ..., K'_{L-1}, V'_{L-1}
        = f(input_ids [B, S], attention_mask [B, P + S], position_ids [B, S],
            K_0, V_0, ..., K_{L-1}, V_{L-1})                    K_i, V_i: [B, H_kv, P, D]

with ``K'_i = concat(K_i, k_i(x), axis=2)`` [B, H_kv, P + S, D] (likewise V): the cache of
every position so far, fed back as the next step's past. :class:`KvDecoder` computes this with
the model's own code: it builds a ``DynamicCache`` from the flat past tensors, calls the model
with ``use_cache=True`` and returns the logits and the cache layers' tensors. It holds the
model's children under their own names, so its weights (and so the LoRA sites) have the paths
PEFT uses. Traced at P = 3 with every axis dynamic (batch, S, P and P + S separate), the file
runs at P = 0 too. ONNX names (``name_io``): inputs ``input_ids``, ``attention_mask``,
``position_ids`` (where the model takes them), ``past_key_values.{i}.key`` / ``.value``;
outputs ``logits``, ``present.{i}.key`` / ``.value``.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir
import torch
from torch import nn

from ..errors import LoraFxError
from ..plugins.hf import max_positions

TRACE_BATCH, TRACE_SEQ, TRACE_PAST = 2, 4, 3   # P = 3: no 0/1 specialization of any axis
INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = (
    "input_ids", "attention_mask", "position_ids", "logits")
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
BATCH, SEQ, PAST, TOTAL = ("batch_size", "sequence_length", "past_sequence_length",
                           "total_sequence_length")


@dataclass(frozen=True)
class DecoderLayout:
    """What a KV-cache export and ORT GenAI need to know of a decoder."""

    model_type: str          # config.model_type ("llama", "gpt2", ...)
    layers: int
    kv_heads: int
    head_dim: int
    heads: int
    hidden: int
    vocab: int
    positions: int           # the longest sequence the model takes (context length)
    position_ids: bool       # forward() takes position_ids
    cache_arg: str           # forward()'s cache keyword: "cache" (transformers 5) or
                             # "past_key_values"
    dtype: torch.dtype
    tokens: dict[str, Any] = field(default_factory=dict)   # bos / eos / pad token ids

    def input_names(self) -> list[str]:
        first = [INPUT_IDS, ATTENTION_MASK] + ([POSITION_IDS] if self.position_ids else [])
        return first + [n % i for i in range(self.layers) for n in (PAST_KEY, PAST_VALUE)]

    def output_names(self) -> list[str]:
        return [LOGITS] + [n % i for i in range(self.layers) for n in (PRESENT_KEY,
                                                                       PRESENT_VALUE)]


def _config(module: nn.Module) -> Any:
    config = getattr(module, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        raise LoraFxError(f"--kv-cache exports a Hugging Face decoder (a *ForCausalLM model); "
                          f"{type(module).__name__} is not one: export it without --kv-cache")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _cache_arg(module: nn.Module) -> str:
    params = inspect.signature(module.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise LoraFxError(f"--kv-cache: {type(module).__name__}.forward takes no KV cache (no "
                      "`cache` or `past_key_values` parameter): it is not a decoder; export it "
                      "without --kv-cache")


def cache_class() -> Any:
    """transformers' ``DynamicCache``."""
    from transformers import DynamicCache  # deferred: transformers is an optional dependency

    return DynamicCache


def _probe(module: nn.Module, config: Any, cache_arg: str) -> tuple[Any, torch.Tensor]:
    """(the cache, logits) of one token through ``module`` with an empty cache."""
    cache = cache_class()(config=config)
    ids = torch.zeros(1, 1, dtype=torch.long, device=_device(module))
    try:
        with torch.no_grad():
            out = module(input_ids=ids, **{cache_arg: cache}, use_cache=True)
    except Exception as err:  # noqa: BLE001 - any failure: not a decoder we can drive
        raise LoraFxError(f"--kv-cache: {type(module).__name__} fails on one token with a cache "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                          "): export it without --kv-cache") from err
    logits = getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise LoraFxError(f"--kv-cache: {type(module).__name__} returns no logits [batch, seq, "
                          "vocab], so it is not a decoder with an LM head: export its "
                          "*ForCausalLM model, or export it without --kv-cache")
    return cache, logits


def _device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def decoder_layout(module: nn.Module) -> DecoderLayout:
    """The layout of ``module``'s KV cache, read from one step of the model itself (heads and
    head size as the cache holds them); refuses models that are not decoders, and caches that
    are not one full-attention tensor pair per layer (sliding windows, linear attention)."""
    config = _config(module)
    cache_arg = _cache_arg(module)
    cache, logits = _probe(module, config, cache_arg)
    layers = list(getattr(cache, "layers", []))
    if not layers:
        raise LoraFxError(f"--kv-cache: {type(module).__name__} filled no cache layer: it is not "
                          "a decoder, or transformers is older than 4.56 (upgrade it)")
    shapes = set()
    for i, layer in enumerate(layers):
        kind = type(layer).__name__
        if kind != "DynamicLayer" or getattr(layer, "keys", None) is None:
            raise LoraFxError(f"--kv-cache: layer {i} of {type(module).__name__} keeps a {kind} "
                              "(sliding-window or linear attention), which --kv-cache does not "
                              "export: export it without --kv-cache")
        shapes.add((tuple(layer.keys.shape), tuple(layer.values.shape)))
    if len(shapes) != 1:
        raise LoraFxError(f"--kv-cache: the layers of {type(module).__name__} cache tensors of "
                          f"different shapes {sorted(shapes)}; ORT GenAI needs one shape")
    (_, kv_heads, _, head_dim), _ = shapes.pop()
    heads = int(getattr(config, "num_attention_heads", kv_heads))
    params = inspect.signature(module.forward).parameters
    return DecoderLayout(
        model_type=str(getattr(config, "model_type", "decoder")), layers=len(layers),
        kv_heads=int(kv_heads), head_dim=int(head_dim), heads=heads,
        hidden=int(getattr(config, "hidden_size", heads * head_dim)),
        vocab=int(logits.shape[-1]), positions=max_positions(config),
        position_ids="position_ids" in params, cache_arg=cache_arg,
        dtype=layers[0].keys.dtype, tokens=_token_ids(module, config))


def _token_ids(module: nn.Module, config: Any) -> dict[str, Any]:
    """bos / eos / pad ids: the generation config's, else the model config's; pad defaults to
    the (first) eos, as ``generate()`` does."""
    gen = getattr(module, "generation_config", None)
    out: dict[str, Any] = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(gen, key, None) if gen is not None else None
        out[key] = value if value is not None else getattr(config, key, None)
    if out["pad_token_id"] is None:
        eos = out["eos_token_id"]
        out["pad_token_id"] = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return out


class KvDecoder(nn.Module):
    """``module`` as f(input_ids, attention_mask, [position_ids,] past) → (logits,
    present...), ``past`` a list [K_0, V_0, K_1, V_1, ...] (see the module docstring).

    The model's children are registered here under their own names (so ``model.layers.0.
    self_attn.q_proj`` is a path of this module, as of the model) and the model itself is kept
    unregistered, to call its forward. The forward runs over *this* module's children: a
    copy-on-write edit of the wrapper (``set_attr_cow``, ``cast_module``) replaces them here
    only, so the decoder is then called as a shallow copy holding them (``_current``).
    """

    def __init__(self, module: nn.Module, layout: DecoderLayout) -> None:
        super().__init__()
        for name, child in module.named_children():
            self.add_module(name, child)
        for name, p in module.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in module.named_buffers(recurse=False):
            self.register_buffer(name, b)
        object.__setattr__(self, "decoder", module)
        self.layout = layout
        self.cache_cls = cache_class()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return self.step(input_ids, attention_mask, position_ids, past)

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             position_ids: torch.Tensor | None, past: list[torch.Tensor]
             ) -> tuple[torch.Tensor, ...]:
        decoder = self._current()
        cache = self.cache_cls(config=decoder.config)
        for i in range(self.layout.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        kwargs: dict[str, Any] = {self.layout.cache_arg: cache}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                      **kwargs)
        present = getattr(out, "cache", None)
        if present is None:  # transformers < 5 names it past_key_values
            present = out.past_key_values
        flat = [out.logits]
        for layer in present.layers:
            flat += [layer.keys, layer.values]
        return tuple(flat)


    def _current(self) -> nn.Module:
        """The decoder with this wrapper's children, parameters and buffers: itself while they
        are its own, else a shallow copy holding them."""
        decoder: nn.Module = self.decoder  # type: ignore[assignment]
        slots = ("_modules", "_parameters", "_buffers")
        pairs: list[tuple[dict[str, Any], dict[str, Any]]] = [
            (getattr(decoder, slot), getattr(self, slot)) for slot in slots]
        if all(theirs.get(k) is v for theirs, ours in pairs for k, v in ours.items()):
            return decoder
        view = copy.copy(decoder)
        for slot, (theirs, ours) in zip(slots, pairs, strict=True):
            object.__setattr__(view, slot, {**theirs, **ours})
        return view


class KvDecoderNoPositions(KvDecoder):
    """:class:`KvDecoder` of a model whose forward takes no ``position_ids``."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,  # type: ignore[override]
                past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return self.step(input_ids, attention_mask, None, past)


@dataclass
class KvModule:
    """A decoder ready to capture and export with its cache: the wrapper, example inputs at
    past ``TRACE_PAST``, dynamic shapes (every axis) and the layout."""

    wrapper: KvDecoder
    example_inputs: tuple[Any, ...]
    dynamic_shapes: tuple[Any, ...]
    layout: DecoderLayout


def kv_decoder(module: nn.Module, seed: int = 0) -> KvModule:
    """``module`` (a Hugging Face decoder) wrapped by :class:`KvDecoder`, with example inputs
    (batch 2, 4 new tokens after 3 cached) and dynamic shapes for ``capture`` / export."""
    module.eval()
    layout = decoder_layout(module)
    cls = KvDecoder if layout.position_ids else KvDecoderNoPositions
    return KvModule(cls(module, layout).eval(), *trace_inputs(layout, seed, _device(module)),
                    layout)


def trace_inputs(layout: DecoderLayout, seed: int = 0, device: torch.device | None = None,
                 batch: int = TRACE_BATCH, seq: int = TRACE_SEQ, past: int = TRACE_PAST
                 ) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(example inputs, dynamic shapes) at ``past`` cached and ``seq`` new tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, layout.vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = [torch.randn(batch, layout.kv_heads, past, layout.head_dim, generator=g)
          .to(layout.dtype).to(device) for _ in range(2 * layout.layers)]
    dyn = torch.export.Dim.DYNAMIC
    args: list[Any] = [ids.to(device), mask.to(device)]
    shapes: list[Any] = [{0: dyn, 1: dyn}, {0: dyn, 1: dyn}]
    if layout.position_ids:
        args.append(positions.to(device))
        shapes.append({0: dyn, 1: dyn})
    args.append(kv)
    shapes.append([{0: dyn, 2: dyn}] * len(kv))
    return tuple(args), tuple(shapes)


def name_io(model: Any, layout: DecoderLayout) -> None:
    """Give an exported ``onnx_ir.Model`` GenAI's input and output names and named axes
    (batch_size, sequence_length, past_sequence_length, total_sequence_length). Its first
    inputs and outputs are the KV decoder's, in order; later inputs (LoRA factors) are kept."""
    graph = model.graph
    names, outs = layout.input_names(), layout.output_names()
    if len(graph.inputs) < len(names) or len(graph.outputs) != len(outs):
        raise LoraFxError(f"internal error: the KV-cache export has {len(graph.inputs)} inputs "
                          f"and {len(graph.outputs)} outputs, expected {len(names)} and "
                          f"{len(outs)}; please report it with the model")
    _free_names(graph, set(names) | set(outs))
    kv = [layout.kv_heads, layout.head_dim]
    shapes: dict[str, list[Any]] = {
        INPUT_IDS: [BATCH, SEQ], ATTENTION_MASK: [BATCH, TOTAL], POSITION_IDS: [BATCH, SEQ],
        LOGITS: [BATCH, SEQ, layout.vocab]}
    for value, name in zip([*graph.inputs[: len(names)], *graph.outputs], [*names, *outs],
                           strict=True):
        value.name = name
        dims: list[Any] = shapes.get(name) or [
            BATCH, kv[0], PAST if name.startswith("past") else TOTAL, kv[1]]
        value.shape = ir.Shape([ir.SymbolicDim(d) if isinstance(d, str) else d for d in dims])


def _free_names(graph: Any, wanted: set[str]) -> None:
    """Rename any intermediate value that already bears one of the ``wanted`` names."""
    ends = {id(v) for v in [*graph.inputs, *graph.outputs]}
    for node in graph:
        for value in node.outputs:
            if value.name in wanted and id(value) not in ends:
                value.name = f"{value.name}__inner"
