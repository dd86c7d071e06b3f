"""Generation with the KV cache: a folder written by ``lorafx export --kv-cache``, decoded by
ONNX Runtime (this module's loop) or by ONNX Runtime GenAI (``ort.genai``).

One step of the exported decoder maps (new tokens, mask over past + new, their positions, the
past K/V of every layer) to (logits, the K/V of past + new). Generation:

1. prefill: the prompts, left-padded to one length S (pad id, mask 0, positions
   ``max(cumsum(mask) − 1, 0)``, as ``generate()`` builds them), with an empty past (P = 0);
2. each next token from the last position's logits: greedy ``argmax``, or sampled from
   ``softmax(logits / T)`` restricted to the top k and to the smallest set of mass >= top_p;
3. decode: that token alone (S = 1), the mask one longer, position + 1, past = the presents;
   a row that produced eos keeps producing pad; stop after ``max_new_tokens`` or when every
   row is done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..deploy_format import A_SUFFIX, B_SUFFIX, IDS_INPUT, TOKENIZER_FILES, read_genai_config
from ..errors import LoraFxError
from .adapters import model_slots, read_ort_adapter
from .serving import AdapterSession


@dataclass(frozen=True)
class Sampling:
    """Greedy when ``do_sample`` is False; else temperature, top-k (0: off), top-p, seed."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


GREEDY = Sampling()


@dataclass
class Generation:
    """New tokens per prompt (up to and including eos) and how long each phase took."""

    tokens: list[list[int]]
    engine: str                       # "onnxruntime" or "onnxruntime_genai"
    provider: str
    prefill_s: float
    decode_s: float
    decode_steps: int                 # decode runs of the model (tokens after the first)
    prompt_lengths: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: new tokens of the batch per second after the prefill."""
        n = self.decode_steps * len(self.tokens)
        return n / self.decode_s if self.decode_s > 0 else float("nan")


@dataclass(frozen=True)
class Folder:
    """A KV-cache export folder: its model file and the facts of ``genai_config.json``."""

    directory: Path
    model: Path
    vocab: int
    context: int
    eos: tuple[int, ...]
    pad: int
    names: dict[str, Any]             # GenAI's decoder.inputs / outputs

    @classmethod
    def open(cls, directory: str | Path) -> Folder:
        config = read_genai_config(directory)
        model, decoder = config["model"], config["model"]["decoder"]
        path = Path(directory) / decoder["filename"]
        if not path.is_file():
            raise LoraFxError(f"{path} (named by genai_config.json) does not exist: export the "
                              "model again with --kv-cache")
        eos = model.get("eos_token_id", [])
        eos = tuple(eos) if isinstance(eos, list) else (int(eos),)
        return cls(Path(directory), path, int(model["vocab_size"]),
                   int(model.get("context_length") or 1 << 30), eos,
                   int(model.get("pad_token_id", eos[0] if eos else 0)),
                   {**decoder["inputs"], **decoder["outputs"]})


def check_prompts(folder: Folder, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Refuse empty prompts, ids outside the vocabulary, and prompt + new tokens beyond the
    model's positions."""
    if not prompts or any(not p for p in prompts):
        raise LoraFxError("a prompt is empty: pass at least one token id per prompt")
    if max_new_tokens < 1:
        raise LoraFxError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    for p in prompts:
        bad = [t for t in p if not 0 <= t < folder.vocab]
        if bad:
            raise LoraFxError(f"prompt id {bad[0]} is outside the vocabulary [0, {folder.vocab}) "
                              f"of {folder.directory}: pass ids the model's tokenizer produces")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > folder.context:
        raise LoraFxError(f"a prompt of {longest} tokens plus {max_new_tokens} new tokens is "
                          f"longer than the model's {folder.context} positions "
                          f"(context_length in {folder.directory}/genai_config.json): shorten "
                          "the prompt or lower --max-new-tokens")


def check_adapter(folder: Folder, adapter: str | Path) -> None:
    """The adapter file's parameters are exactly the model's LoRA inputs, with the model's
    in / out dims (what ``AdapterSession.load`` checks, for engines that do not)."""
    slots = model_slots(folder.model)
    params = read_ort_adapter(adapter)
    sites = {n[: -len(A_SUFFIX)] for n in params if n.endswith(A_SUFFIX)}
    unknown = sorted(n for n in params if n[: -len(A_SUFFIX)] not in slots
                     and n[: -len(B_SUFFIX)] not in slots)
    if unknown:
        raise LoraFxError(f"{adapter}: parameter {unknown[0]!r} is not an adapter input of "
                          f"{folder.model}: the adapter is for another model; convert it with "
                          f"`lorafx convert-adapter DIR --model {folder.model}`")
    missing = sorted(set(slots) - sites)
    if missing:
        raise LoraFxError(f"{adapter} lacks site {missing[0]!r} of {folder.model}: convert it "
                          f"with `lorafx convert-adapter DIR --model {folder.model}`")
    for site in sites:
        a, b, slot = params[site + A_SUFFIX], params[site + B_SUFFIX], slots[site]
        if (slot.in_features, slot.out_features) != (a.shape[0], b.shape[-1]):
            raise LoraFxError(f"{adapter}: site {site!r} is {a.shape[0]}->{b.shape[-1]} but "
                              f"{folder.model} has {slot.in_features}->{slot.out_features}: the "
                              "adapter belongs to another model")


def left_pad(prompts: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, S], mask [B, S]) with each prompt right-aligned after pad tokens."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


def choose(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """The next token of each row from its logits [B, V] (see the module docstring)."""
    if not sampling.do_sample:
        return np.argmax(logits, axis=-1)
    scaled = logits.astype(np.float64) / max(sampling.temperature, 1e-6)
    out = np.empty(len(scaled), dtype=np.int64)
    for row, z in enumerate(scaled):
        order = np.argsort(-z, kind="stable")
        if sampling.top_k > 0:
            order = order[: sampling.top_k]
        p = np.exp(z[order] - z[order[0]])
        p /= p.sum()
        keep = int(np.searchsorted(np.cumsum(p), sampling.top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
        out[row] = order[rng.choice(len(order), p=p)]
    return out


class OrtDecoder:
    """The decoding loop on an ``onnxruntime.InferenceSession`` (``AdapterSession``: adapters
    swapped per run through ``RunOptions.add_active_adapter``)."""

    def __init__(self, folder: Folder, providers: list[str] | None = None,
                 threads: int | None = None) -> None:
        self.folder = folder
        self.sess = AdapterSession(folder.model, providers, threads)
        self.plain = ort.RunOptions()  # no adapter active: the exported defaults
        inputs = {i.name: i for i in self.sess.session.get_inputs()}
        self.past = [n for n in inputs if n.startswith("past_key_values.")]
        self.past_shape = {n: [d if isinstance(d, int) else 0 for d in inputs[n].shape]
                           for n in self.past}
        self.past_type = np.float16 if any(inputs[n].type == "tensor(float16)"
                                           for n in self.past) else np.float32
        self.positions = folder.names.get("position_ids") in inputs
        # present.{i}.key → past_key_values.{i}.key: what each output feeds next step
        self.feed_back = {o: "past_key_values." + o[len("present."):]
                          for o in self.sess.outputs if o.startswith("present.")}

    def load_adapter(self, path: str | Path) -> str:
        name = Path(path).stem
        self.sess.load(name, path)
        return name

    def step(self, feeds: dict[str, Any], adapter: str | None) -> list[Any]:
        """One run on OrtValues (presents stay OrtValues: no copy into numpy)."""
        values = {k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v)
                  for k, v in feeds.items()}
        loaded = self.sess.adapters[adapter] if adapter else None
        options = loaded.run_options if loaded else self.plain
        return list(self.sess.session.run_with_ort_values(self.sess.outputs, values, options))

    def prefill_feeds(self, prompts: list[list[int]]) -> dict[str, Any]:
        ids, mask = left_pad(prompts, self.folder.pad)
        feeds: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if self.positions:
            feeds["position_ids"] = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        for n in self.past:
            shape = list(self.past_shape[n])
            shape[0], shape[2] = len(prompts), 0
            feeds[n] = np.zeros(shape, dtype=self.past_type)
        return feeds

    def generate(self, prompts: list[list[int]], max_new_tokens: int,
                 sampling: Sampling = GREEDY, adapter: str | None = None,
                 rows: list[str | int] | None = None) -> Generation:
        """``rows``: a mixed-batch export's adapter per prompt (names or ids of the set),
        checked before the first run and fed at every step."""
        check_prompts(self.folder, prompts, max_new_tokens)
        rng = np.random.default_rng(sampling.seed)
        ids = self.sess.with_rows({"input_ids": np.zeros((len(prompts), 1), np.int64)}, rows,
                                  adapter).get(IDS_INPUT)
        per_row = {} if ids is None else {IDS_INPUT: ids}
        feeds = {**self.prefill_feeds(prompts), **per_row}
        mask, positions = feeds["attention_mask"], feeds.get("position_ids")
        done = np.zeros(len(prompts), dtype=bool)
        tokens: list[list[int]] = [[] for _ in prompts]
        start = time.perf_counter()
        prefill_s, steps = 0.0, 0
        for step in range(max_new_tokens):
            outs = self.step(feeds, adapter)
            nxt = choose(outs[0].numpy()[:, -1], sampling, rng)
            nxt = np.where(done, self.folder.pad, nxt)
            for row in np.flatnonzero(~done):
                tokens[row].append(int(nxt[row]))
            done |= np.isin(nxt, self.folder.eos)
            if step == 0:
                prefill_s = time.perf_counter() - start
            else:
                steps += 1
            if done.all() or step == max_new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
            feeds = {"input_ids": nxt[:, None].astype(np.int64), "attention_mask": mask,
                     **per_row}
            if positions is not None:
                positions = positions[:, -1:] + 1
                feeds["position_ids"] = positions
            feeds.update({self.feed_back[name]: value for name, value
                          in zip(self.sess.outputs, outs, strict=True)
                          if name in self.feed_back})
        return Generation(tokens, "onnxruntime", self.sess.provider, prefill_s,
                          time.perf_counter() - start - prefill_s, steps,
                          [len(p) for p in prompts])

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of ``texts`` by the folder's tokenizer (transformers' AutoTokenizer)."""
        return [list(hf_tokenizer(self.folder)(text)["input_ids"]) for text in texts]

    def decode(self, tokens: list[int]) -> str:
        return str(hf_tokenizer(self.folder).decode(tokens))


def require_tokenizer(folder: Folder) -> None:
    if not any((folder.directory / name).is_file() for name in TOKENIZER_FILES):
        raise LoraFxError(f"{folder.directory} has no tokenizer files (tokenizer.json, ...): "
                          "pass token ids with --prompt-ids, or export from a model directory "
                          "that has its tokenizer (hf:DIR)")


def hf_tokenizer(folder: Folder) -> Any:
    """transformers' tokenizer of the folder (loaded offline)."""
    require_tokenizer(folder)
    from transformers import AutoTokenizer  # deferred: transformers is an optional dependency

    try:
        return AutoTokenizer.from_pretrained(str(folder.directory), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - tokenizers raise many kinds
        raise LoraFxError(f"cannot load the tokenizer of {folder.directory} ({type(err).__name__}"
                          f"): pass --prompt-ids") from err
