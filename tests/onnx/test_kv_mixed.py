"""``--kv-cache --mixed-batch``: a decoder with its KV cache and an adapter per batch row.

Reference: PEFT's ``generate()`` (greedy) of each prompt alone with that row's adapter (the
base model for ``__base__``), adapters of ranks 4 and 8 on different sites, random A and B."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lora_fx.api import export_kv_mixed
from lora_fx.errors import LoraFxError
from lora_fx.ort.genai_decoder import open_decoder
from tests.helpers import peft_pair, run_cli, tiny_gpt2, tiny_llama

PROMPTS = [[5, 9, 13, 2], [7, 7, 3, 21], [44, 1, 8, 60], [11, 12, 13, 14]]
ROWS = ["__base__", "a1", "a2", "a1"]
NEW = 8


def peft_tokens(pm: Any, prompt: list[int], row: str) -> list[int]:
    """PEFT's greedy continuation of ``prompt`` alone, with adapter ``row``."""
    x = torch.tensor([prompt])
    kwargs = dict(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=NEW,
                  do_sample=False)
    with torch.no_grad():
        if row == "__base__":
            with pm.disable_adapter():
                out = pm.generate(**kwargs)
        else:
            pm.set_adapter(row)
            out = pm.generate(**kwargs)
    return [int(t) for t in out[0, len(prompt):]]


def build(kind: str, tmp: Path) -> dict[str, Any]:
    base: nn.Module = tiny_gpt2() if kind == "gpt2" else tiny_llama()
    pm = peft_pair(base, kind, tmp / "peft", scale=0.3)
    dirs = {"a1": tmp / "peft" / "a1", "a2": tmp / "peft" / "a2"}
    report = export_kv_mixed(base, tmp / "kv" / "model.onnx", dirs)
    want = [peft_tokens(pm, p, r) for p, r in zip(PROMPTS, ROWS, strict=True)]
    return {"base": base, "dirs": dirs, "dir": tmp / "kv", "report": report, "want": want}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build("llama", tmp_path_factory.mktemp("kv_mixed_llama"))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_each_row_decodes_like_peft_generate_with_its_adapter(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    m = request.getfixturevalue(kind) if kind == "llama" else build(kind, tmp_path)
    assert max(m["report"].errors.values()) <= 1e-4
    assert len({tuple(t) for t in m["want"][1:]}) > 1  # the adapters change the tokens
    got = open_decoder(m["dir"], "onnxruntime").generate(PROMPTS, NEW, rows=ROWS).tokens
    for g, w in zip(got, m["want"], strict=True):  # a row stops at eos, as generate() does
        assert g == w[: len(g)] and (len(g) == len(w) or g[-1] == 0)


def test_rows_are_checked_before_the_first_run(llama: dict[str, Any]) -> None:
    decoder = open_decoder(llama["dir"], "onnxruntime")
    with pytest.raises(LoraFxError, match="3 adapters given for a batch of 4 rows"):
        decoder.generate(PROMPTS, 2, rows=ROWS[:3])
    with pytest.raises(LoraFxError, match=r"adapter id 7 is outside \[0, 2\]"):
        decoder.generate(PROMPTS, 2, rows=[0, 7, 1, 1])
    with pytest.raises(LoraFxError, match="takes an adapter per batch row"):
        decoder.generate(PROMPTS, 2)
    with pytest.raises(LoraFxError, match="ONNX Runtime GenAI cannot feed"):
        open_decoder(llama["dir"], "onnxruntime_genai")


def test_cli_export_and_generate(llama: dict[str, Any], tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    llama["base"].save_pretrained(str(hf))
    out = tmp_path / "srv" / "model.onnx"
    dirs = llama["dirs"]
    data = json.loads(run_cli("export", f"hf:{hf}", "--kv-cache", "--mixed-batch", "--adapter",
                              f"a1={dirs['a1']}", "--adapter", f"a2={dirs['a2']}", "-o",
                              str(out), "--json").stdout)
    assert data["adapters"] == {"__base__": 0, "a1": 1, "a2": 2} and data["kv_cache"]
    assert (out.parent / "genai_config.json").is_file() and data["max_abs_diff"] <= 1e-4
    prompts = [x for p in PROMPTS for x in ("--prompt-ids", ",".join(map(str, p)))]
    gen = run_cli("generate", str(out.parent), *prompts, "--adapter-ids", ",".join(ROWS),
                  "--max-new-tokens", str(NEW), "--engine", "onnxruntime", "--json")
    for g, w in zip(json.loads(gen.stdout)["tokens"], llama["want"], strict=True):
        assert g == w[: len(g)] and (len(g) == len(w) or g[-1] == 0)
    bad = run_cli("generate", str(out.parent), *prompts, "--adapter-ids", "a1,a2",
                  "--max-new-tokens", "2", "--engine", "onnxruntime", check=False)
    assert bad.returncode == 1 and "2 adapters given for a batch of 4 rows" in bad.stderr
    assert bad.stderr.count("\n") == 1


def test_fp16_rows_decode_like_peft_generate(llama: dict[str, Any], tmp_path: Path) -> None:
    """`--kv-cache --mixed-batch --dtype fp16`: fp16 cache and stacks, verified against fp32
    within 1e-2 · max(1, max |y|); each row still decodes PEFT's fp32 tokens with its adapter."""
    import onnx

    report = export_kv_mixed(llama["base"], tmp_path / "kv16" / "model.onnx", llama["dirs"],
                             dtype="fp16")
    assert report.dtype == "fp16" and set(report.limits) == set(report.errors)
    assert all(report.errors[k] <= report.limits[k] for k in report.limits)
    proto = onnx.load(str(report.path), load_external_data=False)
    floats = {v.type.tensor_type.elem_type for v in proto.graph.input
              if v.name.startswith("past_key_values") or v.name.endswith(".weight")}
    assert floats == {onnx.TensorProto.FLOAT16}
    got = open_decoder(tmp_path / "kv16", "onnxruntime").generate(PROMPTS, NEW, rows=ROWS).tokens
    for g, w in zip(got, llama["want"], strict=True):
        assert g == w[: len(g)] and (len(g) == len(w) or g[-1] == 0)
