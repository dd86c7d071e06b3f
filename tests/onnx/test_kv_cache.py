"""Decoders exported with their KV cache decode exactly PEFT's ``generate()`` tokens.

For a HF LLaMA (grouped-query attention), GPT-2 (Conv1D, tied LM head) and Qwen2 (q/k/v
biases), hidden 64, 2 layers, otherwise default configs (``use_cache=True``) with a wider
``initializer_range`` and a 1024-token vocabulary: greedy decoding of 16 new tokens for a batch
of 2 prompts, driven by onnxruntime (lorafx's loop) and by onnxruntime_genai, equals PEFT's
``generate()``:
- merged adapter A1 (rank 4);
- unmerged, with A1's file written beside the model, and with a second adapter A2 (rank 8,
  fewer targets) converted by ``convert-adapter`` and swapped in;
- unmerged with no adapter active: the base model's tokens.
Prefill logits are within 1e-4 + 2e-5 · max |logits| of PEFT's (the merged file: of PEFT's ``merge_and_unload()``;
with these wide weights merged and unmerged PEFT differ by up to 3e-4 on a prompt). Every
reference step is decided by a clear margin (top-1 minus top-2 logit, checked), so that no
comparison turns on rounding.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lora_fx.onnx.export import export_kv
from lora_fx.ort.adapters import convert_adapter
from lora_fx.ort.generate import Folder, OrtDecoder

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB, NEW, MARGIN = 1024, 16, 1e-3  # margin: 10x the 1e-4 logits tolerance
FAMILIES: dict[str, tuple[str, str, dict[str, Any], list[str], list[str]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2},
              ["q_proj", "k_proj", "v_proj", "o_proj"], ["q_proj", "v_proj"]),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             {"n_embd": 64, "n_layer": 2, "n_head": 4}, ["c_attn", "c_proj", "c_fc"],
             ["c_attn"]),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2},
              ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], ["q_proj", "v_proj"]),
}


def build(family: str, seed: int = 0) -> torch.nn.Module:
    """The family's model from its default config: hidden 64, 2 layers, vocabulary 1024,
    initializer_range 0.25 (clear greedy margins); special ids past the vocabulary moved in."""
    config_name, model_name, sizes, _, _ = FAMILIES[family]
    config = getattr(transformers, config_name)(vocab_size=VOCAB, initializer_range=0.25,
                                                **sizes)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= VOCAB:
            setattr(config, key, VOCAB - 1)
    assert config.use_cache is True
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


def peft_adapter(base: torch.nn.Module, directory: Path, targets: list[str], r: int,
                 seed: int) -> None:
    """A PEFT adapter with random A and B (B != 0), saved to ``directory``."""
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(str(directory))


def until_eos(row: list[int], eos: tuple[int, ...]) -> list[int]:
    out: list[int] = []
    for t in row:
        out.append(t)
        if t in eos:
            break
    return out


def reference(model: torch.nn.Module, prompts: torch.Tensor, eos: tuple[int, ...]
              ) -> tuple[list[list[int]], np.ndarray]:
    """PEFT's (or the base model's) greedy tokens and prefill logits; asserts the margins."""
    with torch.no_grad():
        prefill = model(input_ids=prompts, attention_mask=torch.ones_like(prompts)).logits
        out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                             max_new_tokens=NEW, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    for step in out.scores:
        top = torch.topk(step.float(), 2, dim=-1).values
        assert float((top[:, 0] - top[:, 1]).min()) > MARGIN, "greedy step decided by rounding"
    tokens = out.sequences[:, prompts.shape[1]:].tolist()
    return [until_eos(row, eos) for row in tokens], prefill.numpy()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, Any]:
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    base = build(name)
    _, _, _, targets1, targets2 = FAMILIES[name]
    peft_adapter(base, tmp / "a1", targets1, 4, seed=1)
    peft_adapter(base, tmp / "a2", targets2, 8, seed=2)
    merged = export_kv(base, tmp / "merged" / "model.onnx", adapter=tmp / "a1", merge=True)
    unmerged = export_kv(base, tmp / "unmerged" / "model.onnx", adapter=tmp / "a1",
                         merge=False, adapter_name="a1")
    convert_adapter(tmp / "a2", tmp / "unmerged" / "a2.onnx_adapter",
                    model=tmp / "unmerged" / "model.onnx")
    eos = Folder.open(tmp / "merged").eos
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(3, VOCAB - 3, (2, 6), generator=g)
    refs = {"base": reference(base, prompts, eos)}
    for adapter in ("a1", "a2"):
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp / adapter)).eval()
        refs[adapter] = reference(pm, prompts, eos)
    with torch.no_grad():  # the merged file's reference: PEFT's merge (W + s·B@A folded)
        folded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp / "a1"))
        refs["a1 merged"] = ([], folded.merge_and_unload().eval()(prompts).logits.numpy())
    return {"name": name, "tmp": tmp, "prompts": prompts.tolist(), "refs": refs,
            "merged": merged, "unmerged": unmerged}


def test_files_have_genai_names_and_dynamic_axes(family: dict[str, Any]) -> None:
    import onnx

    proto = onnx.load(str(family["tmp"] / "unmerged" / "model.onnx"), load_external_data=False)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in proto.graph.input}
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
               for o in proto.graph.output}
    layout = family["unmerged"].layout
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    assert inputs["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert inputs["position_ids"] == ["batch_size", "sequence_length"]
    kv = [layout.kv_heads, layout.head_dim]
    for i in range(layout.layers):
        for part in ("key", "value"):
            assert inputs[f"past_key_values.{i}.{part}"] == [
                "batch_size", kv[0], "past_sequence_length", kv[1]]
            assert outputs[f"present.{i}.{part}"] == [
                "batch_size", kv[0], "total_sequence_length", kv[1]]
    assert outputs["logits"] == ["batch_size", "sequence_length", VOCAB]
    lora = [n for n in inputs if n.endswith((".lora_A.weight", ".lora_B.weight"))]
    assert lora and len(lora) == 2 * len(family["unmerged"].lora_inputs)
    if family["name"] == "llama":
        assert layout.kv_heads == 2 and layout.heads == 4  # grouped-query attention kept
    merged = onnx.load(str(family["tmp"] / "merged" / "model.onnx"), load_external_data=False)
    assert not [i.name for i in merged.graph.input if "lora" in i.name]


def test_adapters_change_the_tokens(family: dict[str, Any]) -> None:
    refs = family["refs"]
    assert refs["a1"][0] != refs["base"][0] and refs["a2"][0] != refs["base"][0]
    assert refs["a1"][0] != refs["a2"][0]


def test_prefill_logits_match_peft(family: dict[str, Any]) -> None:
    prompts = family["prompts"]
    for folder, adapter, ref in (("merged", None, "a1 merged"), ("unmerged", None, "base"),
                                 ("unmerged", "a1.onnx_adapter", "a1"),
                                 ("unmerged", "a2.onnx_adapter", "a2")):
        dec = OrtDecoder(Folder.open(family["tmp"] / folder))
        name = dec.load_adapter(family["tmp"] / folder / adapter) if adapter else None
        logits = dec.step(dec.prefill_feeds(prompts), name)[0].numpy()
        want = family["refs"][ref][1]
        limit = 1e-4 + 2e-5 * float(np.abs(want).max())  # fp32 reordering grows with |y|
        np.testing.assert_allclose(logits, want, atol=limit, rtol=0,
                                   err_msg=f"{folder} {adapter}")


CASES = [("merged", None, "a1"), ("unmerged", "a1.onnx_adapter", "a1"),
         ("unmerged", "a2.onnx_adapter", "a2"), ("unmerged", None, "base")]


def test_onnxruntime_greedy_decodes_peft_tokens(family: dict[str, Any]) -> None:
    for folder, adapter, ref in CASES:
        dec = OrtDecoder(Folder.open(family["tmp"] / folder))
        name = dec.load_adapter(family["tmp"] / folder / adapter) if adapter else None
        got = dec.generate(family["prompts"], NEW, adapter=name)
        assert got.tokens == family["refs"][ref][0], (folder, adapter)


def test_onnxruntime_genai_decodes_peft_tokens(family: dict[str, Any]) -> None:
    pytest.importorskip("onnxruntime_genai")
    from lora_fx.ort.genai_decoder import GenaiDecoder

    for folder, adapter, ref in CASES:
        dec = GenaiDecoder(Folder.open(family["tmp"] / folder), "cpu")
        name = dec.load_adapter(family["tmp"] / folder / adapter) if adapter else None
        got = dec.generate(family["prompts"], NEW, adapter=name)
        assert got.tokens == family["refs"][ref][0], (folder, adapter)
        assert got.engine == "onnxruntime_genai"


def test_prompts_of_different_lengths_decode_like_left_padded_generate(
        family: dict[str, Any]) -> None:
    """A ragged batch: lorafx's loop left-pads it (mask 0, positions cumsum - 1), as a
    left-padded ``generate()`` call; ORT GenAI decodes each prompt on its own generator."""
    folder = Folder.open(family["tmp"] / "merged")
    prompts = [family["prompts"][0][:3], family["prompts"][1]]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[folder.pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    base = build(family["name"])
    pm = peft.PeftModel.from_pretrained(base, str(family["tmp"] / "a1")).eval()
    with torch.no_grad():
        out = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8,
                          do_sample=False, pad_token_id=folder.pad)
    want = [until_eos(row, folder.eos) for row in out[:, width:].tolist()]
    assert OrtDecoder(folder).generate(prompts, 8).tokens == want
    pytest.importorskip("onnxruntime_genai")
    from lora_fx.ort.genai_decoder import GenaiDecoder

    assert GenaiDecoder(folder, "cpu").generate(prompts, 8).tokens == want


@pytest.fixture(scope="module")
def family16(family: dict[str, Any]) -> dict[str, Any]:
    """The family's decoder exported in fp16, A1 merged and unmerged (its file beside it), and
    the error PyTorch's own fp16 makes on PEFT's model (the yardstick for ours)."""
    tmp, name = family["tmp"], family["name"]
    base = build(name)
    merged = export_kv(base, tmp / "merged16" / "model.onnx", adapter=tmp / "a1", dtype="fp16")
    unmerged = export_kv(base, tmp / "unmerged16" / "model.onnx", adapter=tmp / "a1",
                         merge=False, adapter_name="a1", dtype="fp16")
    prompts = torch.tensor(family["prompts"])
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp / "a1")).eval()
    with torch.no_grad():
        want = pm(prompts).logits
        half = copy.deepcopy(pm).half()(prompts).logits.float()
    return {**family, "merged16": merged, "unmerged16": unmerged, "want": want.numpy(),
            "torch_fp16_error": float((half - want).abs().max())}


def test_fp16_files_keep_an_fp16_cache(family16: dict[str, Any]) -> None:
    import onnx

    for folder in ("merged16", "unmerged16"):
        report = family16[folder]
        assert report.dtype == "fp16" and report.limits
        proto = onnx.load(str(report.path), load_external_data=False)
        past = [v for v in [*proto.graph.input, *proto.graph.output]
                if "key" in v.name or "value" in v.name]
        assert past and {v.type.tensor_type.elem_type for v in past} == \
            {onnx.TensorProto.FLOAT16}
    names = [i.name for i in proto.graph.initializer if i.name.endswith(".lora_B.weight")]
    assert names and all(i.data_type == onnx.TensorProto.FLOAT16
                         for i in proto.graph.initializer if i.name in names)


def test_fp16_prefill_and_greedy_tokens_match_peft(family16: dict[str, Any]) -> None:
    """fp16 files against PEFT's fp32 model: prefill logits within 4x the error of PyTorch's
    own fp16 (``.half()`` of the same PEFT model) and the same 16 greedy tokens."""
    limit = 4 * family16["torch_fp16_error"] + 1e-3
    for folder, adapter in (("merged16", None), ("unmerged16", "a1.onnx_adapter")):
        dec = OrtDecoder(Folder.open(family16["tmp"] / folder))
        name = dec.load_adapter(family16["tmp"] / folder / adapter) if adapter else None
        logits = dec.step(dec.prefill_feeds(family16["prompts"]), name)[0].numpy()
        assert logits.dtype == np.float16
        err = float(np.abs(logits.astype(np.float32) - family16["want"]).max())
        assert err <= limit, (folder, err, limit)
        got = dec.generate(family16["prompts"], NEW, adapter=name)
        assert got.tokens == family16["refs"]["a1"][0], folder


def test_a_copy_on_write_edit_of_the_wrapper_reaches_the_decoder() -> None:
    """The wrapper calls its HF decoder over its own children: cast copy-on-write (the user's
    model untouched), it computes as the cast decoder wrapped anew, in fp16, bit for bit."""
    from lora_fx.onnx.kv_cache import kv_decoder
    from lora_fx.onnx.prepare import cast_inputs, cast_module

    base = build("llama")
    kv = kv_decoder(base)
    args = cast_inputs(kv.example_inputs, "fp16")
    with torch.no_grad():
        got = cast_module(kv.wrapper, "fp16")(*args)
        want = kv_decoder(cast_module(base, "fp16")).wrapper(*args)
        fp32 = kv.wrapper(*kv.example_inputs)
    assert got[0].dtype == torch.float16 and fp32[0].dtype == torch.float32
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    assert next(base.parameters()).dtype == torch.float32
