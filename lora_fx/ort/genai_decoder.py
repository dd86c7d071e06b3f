"""Generation by ONNX Runtime GenAI (``onnxruntime_genai``, the optional extra ``genai``).

GenAI reads ``genai_config.json``, pads the batch itself where prompts differ in length (the
pad id marks padding), keeps the KV cache between steps, and activates one adapter per
generator (``og.Adapters`` + ``Generator.set_active_adapter``); an adapter file is checked
against the model's LoRA inputs first (``generate.check_adapter``), since GenAI would only
fail mid-run. ``onnxruntime-genai-cuda`` is the wheel to install beside onnxruntime-gpu (the
CPU wheel pulls the CPU onnxruntime, which clashes); it runs on the CPU where CUDA is absent.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..deploy_format import read_ids
from ..errors import LoraFxError
from .generate import (
    GREEDY,
    Folder,
    Generation,
    OrtDecoder,
    Sampling,
    check_adapter,
    check_prompts,
    require_tokenizer,
)
from .runtime import default_providers


def genai_module() -> Any:
    """``onnxruntime_genai``, or a LoraFxError saying how to install it."""
    try:
        import onnxruntime_genai as og  # deferred: an optional dependency (extra "genai")
    except ImportError as err:
        raise LoraFxError("onnxruntime_genai is not installed: pip install "
                          "'lorafx[genai]' (onnxruntime-genai-cuda, which runs on the CPU too), "
                          "or use --engine onnxruntime") from err
    return og


def genai_available() -> bool:
    try:
        genai_module()
    except LoraFxError:
        return False
    return True


class GenaiDecoder:
    """An ``onnxruntime_genai.Model`` over a KV-cache export folder."""

    def __init__(self, folder: Folder, provider: str = "auto") -> None:
        og = genai_module()
        self.og, self.folder = og, folder
        cuda = provider == "cuda" or (provider == "auto" and
                                      "CUDAExecutionProvider" in default_providers())
        config = og.Config(str(folder.directory))
        config.clear_providers()
        if cuda:
            config.append_provider("cuda")
        try:
            self.model = og.Model(config)
        except Exception as err:  # noqa: BLE001 - GenAI raises RuntimeError / OrtException
            raise LoraFxError(f"ONNX Runtime GenAI cannot load {folder.directory}: "
                              f"{str(err).splitlines()[0] if str(err) else err}") from err
        self.provider = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
        self.adapters = og.Adapters(self.model)
        self.loaded: set[str] = set()

    def load_adapter(self, path: str | Path) -> str:
        check_adapter(self.folder, path)
        name = Path(path).stem
        if name not in self.loaded:
            self.adapters.load(str(path), name)
            self.loaded.add(name)
        return name

    def generator(self, batch: int, max_length: int, sampling: Sampling,
                  adapter: str | None) -> Any:
        params = self.og.GeneratorParams(self.model)
        options: dict[str, Any] = {"max_length": max_length, "batch_size": batch,
                                   "do_sample": sampling.do_sample}
        if sampling.do_sample:
            options.update(temperature=sampling.temperature, top_p=sampling.top_p,
                           top_k=sampling.top_k or self.folder.vocab,
                           random_seed=sampling.seed)
        params.set_search_options(**options)
        gen = self.og.Generator(self.model, params)
        if adapter is not None:
            gen.set_active_adapter(self.adapters, adapter)
        return gen

    def generate(self, prompts: list[list[int]], max_new_tokens: int,
                 sampling: Sampling = GREEDY, adapter: str | None = None) -> Generation:
        """Greedy or sampled decoding of ``prompts``. Prompts of different lengths are decoded
        one generator each: GenAI 0.18 was seen to attend to the left padding of a batch of
        an exported decoder (its mask all ones), where ``generate()`` masks it."""
        check_prompts(self.folder, prompts, max_new_tokens)
        if len({len(p) for p in prompts}) > 1:
            runs = [self.generate([p], max_new_tokens, sampling, adapter) for p in prompts]
            return Generation([r.tokens[0] for r in runs], runs[0].engine, self.provider,
                              sum(r.prefill_s for r in runs), sum(r.decode_s for r in runs),
                              max(r.decode_steps for r in runs), [len(p) for p in prompts])
        ids = np.asarray(prompts, dtype=np.int32)
        width = ids.shape[1]
        gen = self.generator(len(prompts), width + max_new_tokens, sampling, adapter)
        start = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()  # the prefill's logits → the first new token
        prefill_s = time.perf_counter() - start
        steps = 0
        while not gen.is_done():
            gen.generate_next_token()
            steps += 1
        decode_s = time.perf_counter() - start - prefill_s
        tokens = [self._new_tokens(gen.get_sequence(i), width) for i in range(len(prompts))]
        return Generation(tokens, "onnxruntime_genai", self.provider, prefill_s, decode_s,
                          steps, [len(p) for p in prompts])

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of ``texts`` by the folder's tokenizer (GenAI's ``Tokenizer``)."""
        require_tokenizer(self.folder)
        tokenizer = self.og.Tokenizer(self.model)
        return [[int(t) for t in tokenizer.encode(text)] for text in texts]

    def decode(self, tokens: list[int]) -> str:
        return str(self.og.Tokenizer(self.model).decode(np.asarray(tokens, dtype=np.int32)))

    def _new_tokens(self, sequence: Any, width: int) -> list[int]:
        """The tokens after the prompt, up to and including the first eos."""
        out: list[int] = []
        for t in np.asarray(sequence)[width:].tolist():
            out.append(int(t))
            if t in self.folder.eos:
                break
        return out


ENGINES = ("auto", "onnxruntime_genai", "onnxruntime")
PROVIDERS = {"auto": None, "cpu": ["CPUExecutionProvider"],
             "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def open_decoder(directory: str | Path, engine: str = "auto", provider: str = "auto",
                 threads: int | None = None) -> OrtDecoder | GenaiDecoder:
    """A decoder over a KV-cache export folder: ORT GenAI when installed (``auto``), else the
    onnxruntime loop; ``provider`` auto / cpu / cuda."""
    if engine not in ENGINES:
        raise LoraFxError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    if provider not in PROVIDERS:
        raise LoraFxError(f"unknown provider {provider!r}: use one of {', '.join(PROVIDERS)}")
    folder = Folder.open(directory)
    mixed = read_ids(folder.model) is not None  # an adapter per row: GenAI cannot feed the ids
    if mixed and engine == "onnxruntime_genai":
        raise LoraFxError(f"{directory} is a mixed-batch export (an adapter per row), whose "
                          "adapter_ids ONNX Runtime GenAI cannot feed: use --engine onnxruntime")
    if engine == "onnxruntime_genai" or (engine == "auto" and genai_available() and not mixed):
        return GenaiDecoder(folder, provider)
    return OrtDecoder(folder, PROVIDERS[provider], threads)
