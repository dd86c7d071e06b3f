"""Mixed-adapter batches in one ONNX graph: each batch row picks its adapter by ``adapter_ids``.

Reference: PEFT's own mixed batch, ``model(x, adapter_names=[...])``, with two adapters of
different ranks, alphas and target sites, random A and B (never B = 0)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from lora_fx.api import export_mixed
from lora_fx.deploy_format import ids_file, read_ids
from lora_fx.errors import LoraFxError, LoraFxWarning
from lora_fx.ort.adapter_sets import convert_set, named_dirs, row_ids
from lora_fx.ort.serving import AdapterSession
from tests.helpers import peft_pair, run_cli, tiny_gpt2, tiny_llama, token_ids

A, B = ".lora_A.weight", ".lora_B.weight"
ROWS = ["__base__", "a1", "a2", "a1"]
def peft_rows(pm: nn.Module, ids: torch.Tensor, rows: list[str]) -> np.ndarray:
    with torch.no_grad():
        return pm(ids, adapter_names=rows).logits.numpy()  # type: ignore[no-any-return]


def session(path: Path) -> Any:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def build(kind: str, tmp: Path) -> dict[str, Any]:
    base = tiny_gpt2() if kind == "gpt2" else tiny_llama()
    pm = peft_pair(base, kind, tmp / "peft")
    dirs = {"a1": tmp / "peft" / "a1", "a2": tmp / "peft" / "a2"}
    path = tmp / "mixed.onnx"
    report = export_mixed(base, (token_ids(2, 8),), dirs, path)
    return {"base": base, "peft": pm, "dirs": dirs, "path": path, "report": report,
            "proto": onnx.load(str(path))}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build("gpt2", tmp_path_factory.mktemp("mixed_gpt2"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build("llama", tmp_path_factory.mktemp("mixed_llama"))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_rows_equal_peft_adapter_names(kind: str, request: pytest.FixtureRequest) -> None:
    """Rows [base, a1, a2, a1] in ONNX Runtime == PEFT's adapter_names forward, 1e-4."""
    m = request.getfixturevalue(kind)
    assert m["report"].max_abs_diff is not None and m["report"].max_abs_diff <= 1e-4
    x = token_ids(4, 8, seed=5)
    (got,) = session(m["path"]).run(None, {"input_ids": x.numpy(),
                                           "adapter_ids": np.array([0, 1, 2, 1])})
    want = peft_rows(m["peft"], x, ROWS)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert np.abs(got[1] - got[0]).max() > 1e-3 and np.abs(got[2] - got[1]).max() > 1e-3


def test_other_lengths_and_batch_sizes(gpt2: dict[str, Any]) -> None:
    x = token_ids(3, 5, seed=2)
    rows = ["a2", "__base__", "a2"]
    (got,) = session(gpt2["path"]).run(None, {"input_ids": x.numpy(),
                                              "adapter_ids": np.array([2, 0, 2])})
    np.testing.assert_allclose(got, peft_rows(gpt2["peft"], x, rows), rtol=0, atol=1e-4)


def test_stacks_are_overridable_inputs_in_the_documented_layout(gpt2: dict[str, Any]) -> None:
    """[n+1, in, r_max] / [n+1, r_max, out], symbolic n+1 and r, row 0 zero, padding zero,
    zeros where an adapter does not target the site, scale folded into B."""
    proto, pm = gpt2["proto"], gpt2["peft"]
    onnx.checker.check_model(proto)
    inputs = {i.name: i.type.tensor_type.shape.dim for i in proto.graph.input}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert [i.name for i in session(gpt2["path"]).get_inputs()] == ["input_ids", "adapter_ids"]
    assert inputs["adapter_ids"][0].dim_param == inputs["input_ids"][0].dim_param
    modules = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()
               if hasattr(m, "lora_A")}
    sites = {n for n, m in modules.items() if len(m.lora_A)}
    assert set(gpt2["report"].extras["lora_inputs"]) == sites and len(sites) == 8
    for site in sites:
        a, b = inits[site + A], inits[site + B]
        dims_a, dims_b = inputs[site + A], inputs[site + B]
        assert dims_a[0].dim_param == dims_b[0].dim_param == "adapters"
        assert dims_a[2].dim_param and dims_a[2].dim_param == dims_b[1].dim_param
        assert a.shape[0] == 3 and not a[0].any() and not b[0].any()
        for k, name in ((1, "a1"), (2, "a2")):
            if name not in modules[site].lora_A:
                assert not a[k].any() and not b[k].any()  # a site this adapter lacks
                continue
            la = modules[site].lora_A[name].weight.detach().numpy()
            lb = modules[site].lora_B[name].weight.detach().numpy()
            r, s = la.shape[0], modules[site].scaling[name]
            np.testing.assert_allclose(a[k, :, :r], la.T, rtol=0, atol=1e-7)
            np.testing.assert_allclose(b[k, :r, :], s * lb.T, rtol=1e-6, atol=1e-7)
            assert not a[k, :, r:].any() and not b[k, r:, :].any()  # zero padding
        assert a.shape[2] == (8 if site.endswith(("c_attn", "c_proj")) else 4)  # r_max


def test_set_order_is_recorded_beside_the_model(gpt2: dict[str, Any]) -> None:
    path = gpt2["path"]
    assert json.loads(ids_file(path).read_text()) == {"__base__": 0, "a1": 1, "a2": 2}
    meta = {p.key: p.value for p in gpt2["proto"].metadata_props}
    assert json.loads(meta["lorafx.mixed_adapters"]) == ["__base__", "a1", "a2"]


def test_serving_maps_names_to_ids(gpt2: dict[str, Any]) -> None:
    sess = AdapterSession(gpt2["path"], ["CPUExecutionProvider"])
    x = token_ids(4, 6, seed=7)
    (got,) = sess.run({"input_ids": x}, rows=ROWS)
    np.testing.assert_allclose(got, peft_rows(gpt2["peft"], x, ROWS), rtol=0, atol=1e-4)
    (by_id,) = sess.run({"input_ids": x}, rows=[0, 1, 2, 1])
    np.testing.assert_array_equal(by_id, got)
    (bound,) = sess.run_bound({"input_ids": x}, rows=ROWS)
    np.testing.assert_allclose(bound, got, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("rows", "reason"), [
    (["__base__", "a1", "a2", "a3"], "adapter 'a3' is not in the set"),
    ([0, 1, 3, 1], "adapter id 3 is outside [0, 2]"),
    ([0, -1, 2, 1], "adapter id -1 is outside [0, 2]"),
    (["a1", "a2"], "2 adapters given for a batch of 4 rows"),
    (["a1", "a2", "a1", "a2", "a1"], "5 adapters given for a batch of 4 rows"),
])
def test_serving_refuses_bad_rows_before_onnx_runtime(gpt2: dict[str, Any], rows: list[Any],
                                                      reason: str) -> None:
    sess = AdapterSession(gpt2["path"], ["CPUExecutionProvider"])

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("ONNX Runtime was called")

    sess.session.run = never
    sess.session.run_with_iobinding = never
    feeds = {"input_ids": token_ids(4, 6)}
    for call in (lambda: sess.run(feeds, rows=rows), lambda: sess.run_bound(feeds, rows=rows)):
        with pytest.raises(LoraFxError) as err:
            call()
        assert reason in str(err.value) and "\n" not in str(err.value)
    ids = np.array([int(r) if isinstance(r, int) else 0 for r in rows])
    if all(isinstance(r, int) for r in rows):  # the same ids given as the input itself
        with pytest.raises(LoraFxError, match="outside"):
            sess.run({**feeds, "adapter_ids": ids})
    with pytest.raises(LoraFxError, match="adapter per batch row"):
        sess.run(feeds)


def test_a_set_file_replaces_the_adapters_without_reexport(gpt2: dict[str, Any],
                                                           tmp_path: Path) -> None:
    """The set (b2 = PEFT's a2, b1 = a1: another order, names) loaded into the same session."""
    dirs = gpt2["dirs"]
    out = tmp_path / "swapped.onnx_adapter"
    report = convert_set({"b2": dirs["a2"], "b1": dirs["a1"]}, out, model=gpt2["path"])
    assert json.loads(ids_file(out).read_text()) == {"__base__": 0, "b2": 1, "b1": 2}
    assert report.sites["transformer.h.0.attn.c_attn"] == 8 and not report.filled
    sess = AdapterSession(gpt2["path"], ["CPUExecutionProvider"])
    sess.load("swapped", out)
    x = token_ids(4, 6, seed=8)
    (got,) = sess.run({"input_ids": x}, adapter="swapped", rows=["b1", "__base__", "b2", "b1"])
    want = peft_rows(gpt2["peft"], x, ["a1", "__base__", "a2", "a1"])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    with pytest.raises(LoraFxError, match="adapter 'a1' is not in the set"):
        sess.run({"input_ids": x}, adapter="swapped", rows=["a1", "b1", "b1", "b1"])


def test_a_set_of_another_size_fills_sites_it_lacks(gpt2: dict[str, Any],
                                                    tmp_path: Path) -> None:
    """One adapter (a2: no c_fc) where the model stacks two: c_fc gets zeros, ids are 0..1."""
    out = tmp_path / "one.onnx_adapter"
    report = convert_set({"only": gpt2["dirs"]["a2"]}, out, model=gpt2["path"])
    assert sorted(report.filled) == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    sess = AdapterSession(gpt2["path"], ["CPUExecutionProvider"])
    sess.load("one", out)
    x = token_ids(2, 6, seed=9)
    (got,) = sess.run({"input_ids": x}, adapter="one", rows=["only", "__base__"])
    np.testing.assert_allclose(got, peft_rows(gpt2["peft"], x, ["a2", "__base__"]), rtol=0,
                               atol=1e-4)
    with pytest.raises(LoraFxError, match=r"adapter id 2 is outside \[0, 1\]"):
        sess.run({"input_ids": x}, adapter="one", rows=[2, 0])


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))  # type: ignore[no-any-return]


@pytest.mark.parametrize("shape", [(2, 16), (2, 5, 16)])
def test_a_plain_module_symbolic_trace_capture(tmp_path: Path, shape: tuple[int, ...]) -> None:
    """nn.Linear sites of a plain module (fx.symbolic_trace), 2-D and 3-D inputs."""
    import peft

    torch.manual_seed(0)
    net = Net().eval()
    pm = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["fc1"], init_lora_weights=False), adapter_name="a1")
    pm.add_adapter("a2", peft.LoraConfig(r=8, lora_alpha=3, target_modules=["fc1", "fc2"],
                                         init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "ad"))
    x = torch.randn(*shape)
    report = export_mixed(net, (x,), [tmp_path / "ad" / "a1", tmp_path / "ad" / "a2"],
                          tmp_path / "net.onnx")
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-5
    x4 = torch.randn(4, *shape[1:])
    (got,) = session(tmp_path / "net.onnx").run(None, {"x": x4.numpy(),
                                                        "adapter_ids": np.array([0, 1, 2, 1])})
    with torch.no_grad():
        want = pm.eval()(x4, adapter_names=ROWS).numpy()
        base = net(x4).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.abs(want[1:] - base[1:]).min(axis=-1).max() > 1e-3  # B ≠ 0: the adapters act


def test_export_refuses_an_adapter_of_another_base_model(gpt2: dict[str, Any],
                                                         tmp_path: Path) -> None:
    import peft
    from transformers import GPT2Config, GPT2LMHeadModel

    wide = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=48, n_head=4, vocab_size=97,
                                      n_positions=32, use_cache=False))
    other = peft.get_peft_model(wide, peft.LoraConfig(r=4, target_modules=["c_attn"],
                                                      fan_in_fan_out=True))
    other.save_pretrained(str(tmp_path / "wide"))
    dirs = {"a1": gpt2["dirs"]["a1"], "wide": tmp_path / "wide"}
    with pytest.raises(LoraFxError) as err:
        export_mixed(gpt2["base"], (token_ids(2, 8),), dirs, tmp_path / "m.onnx")
    assert "is 48->144 but this model's is 32->96" in str(err.value)
    assert "another base model" in str(err.value) and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(("names", "reason"), [
    (["a1", "a1"], "appears twice"), (["__base__"], "reserved for the base model"),
    (["1"], "a number"), ([], "at least one adapter")])
def test_adapter_names_are_checked(gpt2: dict[str, Any], names: list[str], reason: str,
                                   tmp_path: Path) -> None:
    with pytest.raises(LoraFxError, match=reason):
        export_mixed(gpt2["base"], (token_ids(2, 8),),
                     [(tmp_path / n / ".." / n) for n in names], tmp_path / "m.onnx")


def test_a_half_precision_model_is_refused_with_the_way_out(gpt2: dict[str, Any],
                                                            tmp_path: Path) -> None:
    half = copy.deepcopy(gpt2["base"]).to(torch.float16)
    with pytest.raises(LoraFxError, match="weights are float16, not fp32: pass the fp32 model"):
        export_mixed(half, (token_ids(2, 8),), gpt2["dirs"], tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_a_batch_of_one_is_refused(gpt2: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(LoraFxError, match="batch >= 2"):
        export_mixed(gpt2["base"], (token_ids(1, 8),), gpt2["dirs"], tmp_path / "m.onnx")


def test_row_ids_by_name_and_id() -> None:
    names = ["__base__", "x", "y"]
    assert row_ids(["y", "0", 1, "__base__"], names, 3, 4).tolist() == [2, 0, 1, 0]
    with pytest.raises(LoraFxError, match="neither an adapter name nor an id"):
        row_ids([1.5j], names, 3, 1)  # type: ignore[list-item]


@pytest.mark.parametrize(("text", "reason"), [
    ('{"a1": 1, "a2": 2}', "must map '__base__' to 0"),
    ('{"__base__": 0, "a1": 2}', "without gaps"), ('{"__base__": 0, "a1": "x"}', "without gaps"),
    ("[1, 2]", "not a JSON object"), ("{", "not a JSON object")])
def test_a_bad_ids_file_is_refused(tmp_path: Path, text: str, reason: str) -> None:
    ids_file(tmp_path / "m.onnx").write_text(text)
    with pytest.raises(LoraFxError, match=reason):
        read_ids(tmp_path / "m.onnx")


def test_named_dirs() -> None:
    assert named_dirs(["x=ad/one", "ad/two"]) == {"x": "ad/one", "two": "ad/two"}
    with pytest.raises(LoraFxError, match="appears twice"):
        named_dirs(["a/x", "b/x"])


def test_cli_export_run_and_convert(gpt2: dict[str, Any], tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    gpt2["base"].save_pretrained(str(hf))
    dirs = gpt2["dirs"]
    model = tmp_path / "m.onnx"
    out = run_cli("export", f"hf:{hf}", "--adapter", f"a1={dirs['a1']}", "--adapter",
                  f"a2={dirs['a2']}", "--mixed-batch", "-o", str(model), "--json")
    data = json.loads(out.stdout)
    assert data["adapters"] == {"__base__": 0, "a1": 1, "a2": 2} and data["max_abs_diff"] < 1e-4
    ids = tmp_path / "ids.npy"
    np.save(ids, token_ids(4, 8, seed=3).numpy())
    mask = ("-i", "attention_mask=ones:4x8")
    run = run_cli("run", str(model), "--adapter-ids", ",".join(ROWS), "-i", f"input_ids={ids}",
                  *mask, "--repeat", "1", "--warmup", "0", "--json")
    (item,) = json.loads(run.stdout)["runs"]
    want = peft_rows(gpt2["peft"], token_ids(4, 8, seed=3), ROWS)
    assert item["adapter_ids"] == [0, 1, 2, 1]
    alone = run_cli("run", str(model), "--adapter-ids", ",".join(ROWS), "-i",
                    f"input_ids={ids}", "--repeat", "1", "--warmup", "0", "--json")
    (same,) = json.loads(alone.stdout)["runs"]  # attention_mask follows input_ids: 4 x 8
    assert same["outputs"][0]["shape"][:2] == [4, 8]
    np.testing.assert_allclose(item["outputs"][0]["head"], want.ravel()[:6], atol=1e-4)
    for bad, reason in (("0,1,5,1", "adapter id 5 is outside [0, 2]"),
                        ("a1,a2", "2 adapters given for a batch of 4 rows")):
        proc = run_cli("run", str(model), "--adapter-ids", bad, "-i", f"input_ids={ids}",
                       *mask, check=False)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert reason in proc.stderr and "Traceback" not in proc.stderr
    both = run_cli("export", f"hf:{hf}", "--adapter", str(dirs["a1"]), "--adapter",
                   str(dirs["a2"]), "-o", str(tmp_path / "x.onnx"), check=False)
    assert both.returncode == 1 and "pass --mixed-batch" in both.stderr
    set_file = tmp_path / "set.onnx_adapter"
    conv = run_cli("convert-adapter", f"b2={dirs['a2']}", f"b1={dirs['a1']}", "--mixed-batch",
                   "--model", str(model), "-o", str(set_file), "--json")
    assert json.loads(conv.stdout)["adapters"] == {"__base__": 0, "b2": 1, "b1": 2}
    run = run_cli("run", str(model), "--adapter", str(set_file), "--no-base", "--adapter-ids",
                  "b1,__base__,b2,b1", "-i", f"input_ids={ids}", *mask, "--repeat", "1",
                  "--json")
    (item,) = json.loads(run.stdout)["runs"]
    want = peft_rows(gpt2["peft"], token_ids(4, 8, seed=3), ["a1", "__base__", "a2", "a1"])
    np.testing.assert_allclose(item["outputs"][0]["head"], want.ravel()[:6], atol=1e-4)


@pytest.fixture(scope="module")
def gpt2_fp16(gpt2: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("mixed_fp16") / "m16.onnx"
    report = export_mixed(gpt2["base"], (token_ids(2, 8),), gpt2["dirs"], path, dtype="fp16")
    return {**gpt2, "path": path, "report": report}


def fp16_close(got: np.ndarray, want: np.ndarray) -> None:
    """fp16 against PEFT's fp32: within 1e-2 · max(1, max |y|) (fp16 keeps ~3 digits)."""
    assert got.dtype == np.float16
    tol = 1e-2 * max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=0, atol=tol)


def test_fp16_rows_equal_peft_adapter_names(gpt2_fp16: dict[str, Any]) -> None:
    """An fp16 file: stacks stored in fp16 (scales folded in fp32 first), rows [base, a1, a2,
    a1] within fp16's tolerance of PEFT's fp32 adapter_names forward, each row still its own."""
    m = gpt2_fp16
    assert m["report"].extras["dtype"] == "fp16" and m["report"].max_abs_diff is not None
    proto = onnx.load(str(m["path"]))
    stacks = [i for i in proto.graph.initializer if i.name.endswith((A, B))]
    assert len(stacks) == 16 and {i.data_type for i in stacks} == {onnx.TensorProto.FLOAT16}
    x = token_ids(4, 8, seed=5)
    (got,) = session(m["path"]).run(None, {"input_ids": x.numpy(),
                                           "adapter_ids": np.array([0, 1, 2, 1])})
    want = peft_rows(m["peft"], x, ROWS)
    fp16_close(got, want)
    assert np.abs(want[1] - want[0]).max() > 0.1  # the rows' adapters matter at this tolerance


def test_fp16_set_file_takes_the_models_dtype(gpt2_fp16: dict[str, Any],
                                              tmp_path: Path) -> None:
    dirs, out = gpt2_fp16["dirs"], tmp_path / "set16.onnx_adapter"
    report = convert_set({"b2": dirs["a2"], "b1": dirs["a1"]}, out, model=gpt2_fp16["path"])
    assert report.dtype == "fp16"
    sess = AdapterSession(gpt2_fp16["path"], ["CPUExecutionProvider"])
    sess.load("set", out)
    x = token_ids(3, 6, seed=4)
    (got,) = sess.run({"input_ids": x}, adapter="set", rows=["b1", "b2", "__base__"])
    fp16_close(got, peft_rows(gpt2_fp16["peft"], x, ["a1", "a2", "__base__"]))


def test_bf16_stacks_are_bf16(gpt2: dict[str, Any], tmp_path: Path) -> None:
    """bf16: written with bf16 stacks; verified where ONNX Runtime has bf16 kernels, else
    reported unverified (its CPU provider has none for Add/Mul)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoraFxWarning)
        report = export_mixed(gpt2["base"], (token_ids(2, 8),), gpt2["dirs"],
                              tmp_path / "m.onnx", dtype="bf16")
    assert report.extras["error_vs_fp32"]["pytorch"] < 0.05
    assert report.max_abs_diff is not None or "verify_skipped" in report.extras
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert {i.data_type for i in proto.graph.initializer if i.name.endswith((A, B))} == \
        {onnx.TensorProto.BFLOAT16}


def test_cli_fp16_export_and_kv_bf16_refusal(gpt2: dict[str, Any], tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    gpt2["base"].save_pretrained(str(hf))
    dirs = gpt2["dirs"]
    out = run_cli("export", f"hf:{hf}", "--adapter", f"a1={dirs['a1']}", "--mixed-batch",
                  "--dtype", "fp16", "-o", str(tmp_path / "m.onnx"), "--json")
    data = json.loads(out.stdout)
    assert data["dtype"] == "fp16" and data["error_vs_fp32"]["onnxruntime"] < 0.05
    proc = run_cli("export", f"hf:{hf}", "--adapter", f"a1={dirs['a1']}", "--mixed-batch",
                   "--kv-cache", "--dtype", "bf16", "-o", str(tmp_path / "kv" / "model.onnx"),
                   check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--kv-cache exports fp32 or fp16, not --dtype bf16" in proc.stderr
    assert not (tmp_path / "kv").exists()
