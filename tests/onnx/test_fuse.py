"""Fused KV decoders (``onnx.fuse``, issue 25 item 1): onnxscript's ONNX Runtime fusions on the
exported file keep PEFT's results.

A tiny default-style LLaMA (hidden 64, 2 layers, 4/2 heads, the helpers of test_kv_cache),
adapter A1 (rank 4) merged and unmerged, A2 (rank 8, fewer targets) converted against the
unmerged file and swapped in. The fused files hold SimplifiedLayerNormalization (the final
norm) and SkipSimplifiedLayerNormalization (every other RMSNorm with its residual add); the
unmerged file keeps every MatMul branch and its A', B' inputs. Prefill logits are within
1e-4 + 2e-5 · max |logits| of PEFT's, and onnxruntime and ORT GenAI decode PEFT's greedy
tokens.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lora_fx.onnx.export import export_kv
from lora_fx.ort.adapters import convert_adapter
from lora_fx.ort.generate import Folder, OrtDecoder
from tests.onnx.test_kv_cache import FAMILIES, NEW, VOCAB, build, peft_adapter, reference

peft = pytest.importorskip("peft")

FUSED = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 4}
CASES = [("merged", None, "a1"), ("unmerged", "a1.onnx_adapter", "a1"),
         ("unmerged", "a2.onnx_adapter", "a2"), ("unmerged", None, "base")]


def ops(path: Path) -> Counter[str]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return Counter(node.op_type for node in proto.graph.node)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("fuse")
    base = build("llama")
    _, _, _, targets1, targets2 = FAMILIES["llama"]
    peft_adapter(base, tmp / "a1", targets1, 4, seed=1)
    peft_adapter(base, tmp / "a2", targets2, 8, seed=2)
    reports = {
        "merged": export_kv(base, tmp / "merged" / "model.onnx", adapter=tmp / "a1",
                            fuse=True),
        "unmerged": export_kv(base, tmp / "unmerged" / "model.onnx", adapter=tmp / "a1",
                              merge=False, adapter_name="a1", fuse=True),
        "plain": export_kv(base, tmp / "plain" / "model.onnx", adapter=tmp / "a1",
                           merge=False, adapter_name="a1"),
    }
    convert_adapter(tmp / "a2", tmp / "unmerged" / "a2.onnx_adapter",
                    model=tmp / "unmerged" / "model.onnx")
    eos = Folder.open(tmp / "merged").eos
    prompts = torch.randint(3, VOCAB - 3, (2, 6), generator=torch.Generator().manual_seed(3))
    refs = {"base": reference(base, prompts, eos)}
    for adapter in ("a1", "a2"):
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp / adapter)).eval()
        refs[adapter] = reference(pm, prompts, eos)
    with torch.no_grad():
        folded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp / "a1"))
        refs["a1 merged"] = ([], folded.merge_and_unload().eval()(prompts).logits.numpy())
    return {"tmp": tmp, "reports": reports, "prompts": prompts.tolist(), "refs": refs}


def test_fused_files_hold_the_fused_ops(llama: dict[str, Any]) -> None:
    tmp, reports = llama["tmp"], llama["reports"]
    for folder in ("merged", "unmerged"):
        assert reports[folder].extras["fused"] == FUSED, folder
        found = ops(tmp / folder / "model.onnx")
        assert {op: found[op] for op in FUSED} == FUSED, folder
        assert found["Pow"] == 0  # no RMSNorm left unfused
        config = json.loads((tmp / folder / "genai_config.json").read_text())
        assert config["search"]["past_present_share_buffer"] is False  # no GQA: own buffers
    plain = ops(tmp / "plain" / "model.onnx")
    assert "fused" not in reports["plain"].extras and not any(plain[op] for op in FUSED)


def test_unmerged_fused_file_keeps_its_lora_branches(llama: dict[str, Any]) -> None:
    import onnx

    tmp = llama["tmp"]

    def lora(path: Path) -> list[str]:
        proto = onnx.load(str(path), load_external_data=False)
        return [i.name for i in proto.graph.input if i.name.endswith(
            (".lora_A.weight", ".lora_B.weight"))]

    assert lora(tmp / "unmerged" / "model.onnx") == lora(tmp / "plain" / "model.onnx")
    assert len(lora(tmp / "unmerged" / "model.onnx")) == \
        2 * len(llama["reports"]["unmerged"].lora_inputs)
    assert ops(tmp / "unmerged" / "model.onnx")["MatMul"] == \
        ops(tmp / "plain" / "model.onnx")["MatMul"]


def test_fused_prefill_logits_match_peft(llama: dict[str, Any]) -> None:
    for folder, adapter, ref in (("merged", None, "a1 merged"), ("unmerged", None, "base"),
                                 ("unmerged", "a1.onnx_adapter", "a1"),
                                 ("unmerged", "a2.onnx_adapter", "a2")):
        dec = OrtDecoder(Folder.open(llama["tmp"] / folder))
        name = dec.load_adapter(llama["tmp"] / folder / adapter) if adapter else None
        logits = dec.step(dec.prefill_feeds(llama["prompts"]), name)[0].numpy()
        want = llama["refs"][ref][1]
        limit = 1e-4 + 2e-5 * float(np.abs(want).max())
        np.testing.assert_allclose(logits, want, atol=limit, rtol=0,
                                   err_msg=f"{folder} {adapter}")


def test_fused_files_decode_peft_tokens_in_onnxruntime(llama: dict[str, Any]) -> None:
    for folder, adapter, ref in CASES:
        dec = OrtDecoder(Folder.open(llama["tmp"] / folder))
        name = dec.load_adapter(llama["tmp"] / folder / adapter) if adapter else None
        got = dec.generate(llama["prompts"], NEW, adapter=name)
        assert got.tokens == llama["refs"][ref][0], (folder, adapter)


def test_fused_files_decode_peft_tokens_in_onnxruntime_genai(llama: dict[str, Any]) -> None:
    pytest.importorskip("onnxruntime_genai")
    from lora_fx.ort.genai_decoder import GenaiDecoder

    for folder, adapter, ref in CASES:
        dec = GenaiDecoder(Folder.open(llama["tmp"] / folder), "cpu")
        name = dec.load_adapter(llama["tmp"] / folder / adapter) if adapter else None
        got = dec.generate(llama["prompts"], NEW, adapter=name)
        assert got.tokens == llama["refs"][ref][0], (folder, adapter)
        assert got.engine == "onnxruntime_genai"


def test_cli_fuse_is_opt_in(tmp_path: Path) -> None:
    from tests.helpers import run_cli

    hf = tmp_path / "hf"
    build("llama").save_pretrained(str(hf))
    runs = {}
    for name, flags in (("fused", ["--fuse"]), ("plain", [])):
        out = tmp_path / name / "model.onnx"
        runs[name] = json.loads(run_cli("export", f"hf:{hf}", "--kv-cache", "-o", str(out),
                                        *flags, "--json").stdout)
    assert runs["fused"]["fused"] == FUSED and runs["plain"]["fused"] == {}
    assert not any(ops(tmp_path / "plain" / "model.onnx")[op] for op in FUSED)
    assert runs["plain"]["nodes"] > runs["fused"]["nodes"]
