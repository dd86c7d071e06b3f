"""Unmerged ONNX export: branches kept as MatMul(x, A') → MatMul(·, B') → Add with A', B' as
overridable initializers named ``<site>.lora_A.weight`` (in, r) / ``<site>.lora_B.weight``
(r, out, scale folded), rank axis symbolic. References: PEFT's forward and hand computations."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import lora_fx
from lora_fx.api import export_onnx
from lora_fx.errors import LoraFxError
from lora_fx.load.model import load_model
from tests.helpers import (
    TINY,
    peft_model_like,
    randomize_lora,
    run_cli,
    tiny_gpt2,
    tiny_llama,
    token_ids,
)

GPT2_CFG: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"])
A, B = ".lora_A.weight", ".lora_B.weight"


def session(path: Path) -> Any:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def peft_random(base: nn.Module, seed: int, **cfg: Any) -> nn.Module:
    """PEFT's model with random A and B (never B = 0), built by PEFT alone."""
    import peft

    torch.manual_seed(seed)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False,
                                                                  **cfg))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return pm.eval()


def logits(model: nn.Module, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(ids).logits.numpy()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny GPT-2 (Conv1D/addmm sites), random adapter X, exported unmerged once."""
    base = tiny_gpt2()
    x = token_ids()
    gm = lora_fx.inject(base, (x,), lora_fx.LoraConfig(**GPT2_CFG))
    randomize_lora(gm, seed=0)
    gm.eval()
    path = tmp_path_factory.mktemp("unmerged") / "gpt2.onnx"
    report = export_onnx(gm, (x,), path, merge=False)
    ref = peft_model_like(base, gm, fan_in_fan_out=True, **GPT2_CFG)
    return {"base": base, "gm": gm, "x": x, "path": path, "report": report, "peft": ref,
            "proto": onnx.load(str(path))}


def test_adapter_inputs_are_named_overridable_and_rank_symbolic(gpt2: dict[str, Any]) -> None:
    proto = gpt2["proto"]
    onnx.checker.check_model(proto)
    inputs = {i.name: i.type.tensor_type.shape.dim for i in proto.graph.input}
    inits = {i.name for i in proto.graph.initializer}
    sites = sorted(lora_fx.branches(gpt2["gm"]))
    assert len(sites) == 4 and set(gpt2["report"].extras["lora_inputs"]) == set(sites)
    for site in sites:
        a, b = inputs[site + A], inputs[site + B]
        assert site + A in inits and site + B in inits  # initializer and input: overridable
        assert a[0].dim_value == 32 and a[1].dim_param and not a[1].HasField("dim_value")
        assert b[0].dim_param == a[1].dim_param  # one symbolic rank per site
        assert b[1].dim_value == (96 if site.endswith("c_attn") else 128)
    sess = session(gpt2["path"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids"]
    overridable = {i.name for i in sess.get_overridable_initializers()}
    assert {s + A for s in sites} | {s + B for s in sites} <= overridable
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["lorafx.lora_sites"])[sites[0]] == [32, 96, 4]


def test_each_branch_is_matmul_matmul_add(gpt2: dict[str, Any]) -> None:
    nodes = list(gpt2["proto"].graph.node)
    for site in gpt2["report"].extras["lora_inputs"]:
        first = [n for n in nodes if site + A in n.input]
        assert [n.op_type for n in first] == ["MatMul"] and first[0].input[1] == site + A
        second = [n for n in nodes if first[0].output[0] in n.input]
        assert [n.op_type for n in second] == ["MatMul"] and list(second[0].input) == [
            first[0].output[0], site + B]
        add = [n for n in nodes if second[0].output[0] in n.input]
        assert [n.op_type for n in add] == ["Add"]


def test_op_histogram_is_base_plus_branches(gpt2: dict[str, Any], tmp_path: Path) -> None:
    """Nothing but the branches changes: base export + 2 MatMul and 1 Add per site."""
    gm = lora_fx.capture(gpt2["base"], (gpt2["x"],))
    base = export_onnx(gm, (gpt2["x"],), tmp_path / "base.onnx", verify=False)
    n = len(gpt2["report"].extras["lora_inputs"])
    want = Counter(base.op_histogram) + Counter({"ai.onnx::MatMul": 2 * n, "ai.onnx::Add": n})
    assert Counter(gpt2["report"].op_histogram) == want


def test_scale_is_folded_into_b(gpt2: dict[str, Any]) -> None:
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in gpt2["proto"].graph.initializer}
    s = GPT2_CFG["lora_alpha"] / GPT2_CFG["r"]
    for site, branch in lora_fx.branches(gpt2["gm"]).items():
        a, b = branch.lora_A.weight.detach().numpy(), branch.lora_B.weight.detach().numpy()
        np.testing.assert_allclose(inits[site + A], a.T, rtol=0, atol=1e-7)
        np.testing.assert_allclose(inits[site + B], s * b.T, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(2, 8), (1, 5), (3, 11)])
def test_defaults_equal_peft_at_any_batch_and_length(gpt2: dict[str, Any],
                                                     shape: tuple[int, int]) -> None:
    ids = token_ids(*shape, seed=sum(shape))
    (got,) = session(gpt2["path"]).run(None, {"input_ids": ids.numpy()})
    np.testing.assert_allclose(got, logits(gpt2["peft"], ids), rtol=0, atol=1e-4)


def test_feeding_a_different_rank_gives_that_adapters_output(gpt2: dict[str, Any]) -> None:
    """A rank-2 adapter with rank_pattern/alpha_pattern, fed as plain named inputs."""
    cfg = dict(r=2, lora_alpha=3, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
               rank_pattern={"c_fc": 5}, alpha_pattern={"c_fc": 7})
    pm = peft_random(gpt2["base"], 1, **cfg)
    feeds: dict[str, np.ndarray] = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            site = name.removeprefix("base_model.model.")
            a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            s = mod.scaling["default"]
            feeds[site + A] = a.detach().numpy().T.copy()
            feeds[site + B] = (s * b.detach().numpy()).T.copy()
    assert {v.shape[1] for k, v in feeds.items() if k.endswith(A)} == {2, 5}
    ids = token_ids(2, 6, seed=3)
    (got,) = session(gpt2["path"]).run(None, {"input_ids": ids.numpy(), **feeds})
    np.testing.assert_allclose(got, logits(pm, ids), rtol=0, atol=1e-4)


def test_export_leaves_the_injected_model_alone(gpt2: dict[str, Any]) -> None:
    gm = gpt2["gm"]
    assert all(type(b).__name__ == "LoraLinear" for b in lora_fx.branches(gm).values())
    with torch.no_grad():
        got = gm(gpt2["x"]).logits
    np.testing.assert_allclose(got.numpy(), logits(gpt2["peft"], gpt2["x"]), atol=1e-5)


def test_llama_linear_sites(tmp_path: Path) -> None:
    """aten.linear sites on 3-D activations: defaults == PEFT at another batch and length.
    B = 0 at both v_proj sites: equal initializers that the exporter's optimizer would merge."""
    base, x = tiny_llama(), token_ids()
    cfg: dict[str, Any] = dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"])
    gm = lora_fx.inject(base, (x,), lora_fx.LoraConfig(**cfg))
    randomize_lora(gm, seed=5)
    with torch.no_grad():
        for site, branch in lora_fx.branches(gm).items():
            if site.endswith("v_proj"):
                branch.lora_B.weight.zero_()
    report = export_onnx(gm.eval(), (x,), tmp_path / "llama.onnx", merge=False)
    assert len(report.extras["lora_inputs"]) == 4 and report.max_abs_diff is not None
    ids = token_ids(3, 5, seed=9)
    (got,) = session(tmp_path / "llama.onnx").run(None, {"input_ids": ids.numpy()})
    np.testing.assert_allclose(got, logits(peft_model_like(base, gm, **cfg), ids), atol=1e-4)


def test_fp16_unmerged_reports_error_against_fp32(gpt2: dict[str, Any], tmp_path: Path) -> None:
    """torch.export capture: re-captured from the fp16 eager model, A'/B' cast once."""
    path = tmp_path / "gpt2_fp16.onnx"
    report = export_onnx(gpt2["gm"], (gpt2["x"],), path, merge=False, dtype="fp16",
                         model=gpt2["base"])
    errors = report.extras["error_vs_fp32"]
    assert 0 < errors["pytorch"] < 1e-2 and 0 < errors["onnxruntime"] < 1e-2
    proto = onnx.load(str(path))
    types = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
    site = next(iter(report.extras["lora_inputs"]))
    assert types[site + A] == types[site + B] == onnx.TensorProto.FLOAT16
    assert next(gpt2["base"].parameters()).dtype == torch.float32  # the user's model untouched


def test_dtype_of_an_export_capture_needs_the_eager_model(gpt2: dict[str, Any],
                                                           tmp_path: Path) -> None:
    """Without model=, the capture's own skeleton (capture.recapture) is the eager model;
    a graph that keeps none is refused."""
    from lora_fx.capture.recapture import SOURCE_KEY

    report = export_onnx(gpt2["gm"], (gpt2["x"],), tmp_path / "own.onnx", dtype="fp16")
    assert report.max_abs_diff is not None
    bare = lora_fx.merge(gpt2["gm"])
    bare.meta.pop(SOURCE_KEY)
    with pytest.raises(LoraFxError, match="needs the eager model"):
        export_onnx(bare, (gpt2["x"],), tmp_path / "x.onnx", dtype="fp16")
    with pytest.raises(LoraFxError, match="not supported"):  # int4 / int8 are precisions now
        export_onnx(gpt2["gm"], (gpt2["x"],), tmp_path / "x.onnx", dtype="int3",
                    model=gpt2["base"])


def test_conv_lora_is_refused_with_advice(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(1, 3, 6, 6)
    model(x)
    gm = lora_fx.inject(model, (x,), lora_fx.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(LoraFxError, match="conv LoRA.*merged"):
        export_onnx(gm, (x,), tmp_path / "c.onnx", merge=False)


def test_cli_export_no_merge_fp16(tmp_path: Path) -> None:
    """`lorafx export --no-merge --dtype fp16` on the functional MLP (symbolic_trace)."""
    model = str(TINY)
    loaded = load_model(model)
    gm = lora_fx.inject(loaded.module, loaded.example_inputs,
                        lora_fx.LoraConfig(r=2, target_modules=["w_in", "w_up"]))
    randomize_lora(gm, seed=7)
    lora_fx.save_adapter(gm, tmp_path / "ad")
    out = run_cli("export", model, "--adapter", str(tmp_path / "ad"), "--no-merge",
                  "--dtype", "fp16", "-o", str(tmp_path / "m.onnx"), "--json")
    data = json.loads(out.stdout)
    assert data["dtype"] == "fp16" and set(data["lora_inputs"]) == {"w_in", "w_up"}
    assert data["error_vs_fp32"]["onnxruntime"] < 1e-2
    inputs = {i.name for i in onnx.load(str(tmp_path / "m.onnx")).graph.input}
    assert {"w_in" + A, "w_in" + B, "w_up" + A, "w_up" + B} <= inputs
