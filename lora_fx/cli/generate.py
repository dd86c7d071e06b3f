"""``lorafx generate``: decode with the KV cache from a ``lorafx export --kv-cache`` folder.
"""

from __future__ import annotations

from typing import Any

import click

from ..errors import LoraFxError
from ..ort.genai_decoder import ENGINES, PROVIDERS, open_decoder
from ..ort.generate import OrtDecoder, Sampling
from .common import echo_json


def parse_ids(text: str) -> list[int]:
    """``"1,2,3"`` → [1, 2, 3]; anything else is refused with the expected form."""
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError as err:
        raise LoraFxError(f"--prompt-ids {text!r}: pass comma-separated integers such as "
                          "1,2,3") from err


@click.command("generate")
@click.argument("directory", type=click.Path())
@click.option("--prompt-ids", "prompt_ids", multiple=True,
              help="One prompt as comma-separated token ids (repeat for a batch).")
@click.option("--prompt", "texts", multiple=True,
              help="One prompt as text, tokenized by the folder's tokenizer (repeatable).")
@click.option("--adapter", type=click.Path(),
              help=".onnx_adapter file to activate (unmerged export; lorafx convert-adapter).")
@click.option("--adapter-ids", "adapter_ids", default=None,
              help="A --mixed-batch export's adapter per prompt, comma-separated names or ids "
                   "(e.g. __base__,a1,a2); with --adapter, names of that set.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--do-sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0: no top-k cut.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--engine", type=click.Choice(ENGINES), default="auto", show_default=True,
              help="auto: ONNX Runtime GenAI when installed, else the onnxruntime loop.")
@click.option("--provider", type=click.Choice(list(PROVIDERS)), default="auto",
              show_default=True, help="auto: CUDA when present, else CPU.")
@click.option("--threads", type=int, default=None,
              help="ONNX Runtime intra-op threads (onnxruntime engine).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
def generate_command(directory: str, prompt_ids: tuple[str, ...], texts: tuple[str, ...],
                     adapter: str | None, adapter_ids: str | None, max_new_tokens: int,
                     do_sample: bool,
                     temperature: float, top_k: int, top_p: float, seed: int, engine: str,
                     provider: str, threads: int | None, as_json: bool) -> None:
    """Generate from a KV-cache export DIRECTORY: new tokens and tokens/s."""

    if bool(prompt_ids) == bool(texts):
        raise LoraFxError("pass the prompt as --prompt-ids 1,2,3 or as --prompt TEXT (one of "
                          "the two, repeatable for a batch)")
    decoder = open_decoder(directory, engine, provider, threads)
    prompts = [parse_ids(p) for p in prompt_ids] if prompt_ids else decoder.encode(list(texts))
    name = decoder.load_adapter(adapter) if adapter else None
    sampling = Sampling(do_sample, temperature, top_k, top_p, seed)
    if adapter_ids is not None:
        if not isinstance(decoder, OrtDecoder):
            raise LoraFxError("--adapter-ids needs the onnxruntime engine (ONNX Runtime GenAI "
                              "cannot feed adapter_ids): pass --engine onnxruntime")
        rows: list[str | int] = [t.strip() for t in adapter_ids.split(",")]
        result = decoder.generate(prompts, max_new_tokens, sampling, name, rows=rows)
    else:
        result = decoder.generate(prompts, max_new_tokens, sampling, name)
    data: dict[str, Any] = {
        "engine": result.engine, "provider": result.provider, "adapter": adapter,
        "adapter_ids": adapter_ids.split(",") if adapter_ids else None,
        "tokens": result.tokens, "prompt_lengths": result.prompt_lengths,
        "prefill_ms": round(result.prefill_s * 1e3, 3),
        "decode_ms": round(result.decode_s * 1e3, 3),
        "decode_tokens_per_s": round(result.tokens_per_s, 2)}
    if texts:
        data["text"] = [decoder.decode(t) for t in result.tokens]
    if as_json:
        echo_json(data)
        return
    for i, tokens in enumerate(result.tokens):
        click.echo(f"[{i}] {' '.join(map(str, tokens))}")
        if texts:
            click.echo(f"    {data['text'][i]!r}")
    click.echo(f"{result.engine} on {result.provider}"
               f"{f', adapter {adapter}' if adapter else ''}: prefill {data['prefill_ms']:.1f} ms "
               f"({len(prompts)} x {max(result.prompt_lengths)} tokens), decode "
               f"{data['decode_tokens_per_s']:.1f} tokens/s")
