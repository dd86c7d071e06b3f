"""One ONNX Runtime session, many adapters: ONNX Runtime's own API (LoraAdapter,
RunOptions.add_active_adapter) and lorafx's AdapterSession, against PEFT's forward."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import lora_fx
from lora_fx.api import export_onnx
from lora_fx.errors import LoraFxError, LoraFxWarning
from lora_fx.ort import runtime
from lora_fx.ort.adapters import convert_adapter
from lora_fx.ort.serving import AdapterSession
from tests.helpers import peft_model_like, randomize_lora, tiny_gpt2, token_ids

TARGETS = ["c_attn", "c_fc"]
X_CFG: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=TARGETS)
ADAPTERS: dict[str, dict[str, Any]] = {  # ranks differ from the exported adapter's (4)
    "y": dict(r=2, lora_alpha=5, target_modules=TARGETS),
    "z": dict(r=6, lora_alpha=4, target_modules=TARGETS, use_rslora=True,
              rank_pattern={"c_fc": 3}, alpha_pattern={"h.1.attn.c_attn": 9}),
}


def peft_saved(base: nn.Module, directory: Path, seed: int, **cfg: Any) -> nn.Module:
    """A PEFT model with random A and B, saved by PEFT's save_pretrained (the adapter dir)."""
    import peft

    torch.manual_seed(seed)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        fan_in_fan_out=True, init_lora_weights=False, **cfg))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(str(directory))
    return pm.eval()


def logits(model: nn.Module, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(ids).logits.numpy()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """GPT-2 exported unmerged with adapter X (r=4); adapters Y (r=2) and Z (r=6/3, rsLoRA,
    patterns) saved by PEFT and converted with the model's names checked."""
    tmp = tmp_path_factory.mktemp("serving")
    base, x = tiny_gpt2(), token_ids()
    gm = lora_fx.inject(base, (x,), lora_fx.LoraConfig(**X_CFG))
    randomize_lora(gm, seed=0)
    export_onnx(gm.eval(), (x,), tmp / "model.onnx", merge=False)
    refs = {None: peft_model_like(base, gm, fan_in_fan_out=True, **X_CFG)}
    files = {}
    for i, (name, cfg) in enumerate(ADAPTERS.items()):
        refs[name] = peft_saved(base, tmp / name, seed=10 + i, **cfg)
        files[name] = tmp / f"{name}.onnx_adapter"
        report = convert_adapter(tmp / name, files[name], model=tmp / "model.onnx")
        assert report.filled == []
    return {"model": tmp / "model.onnx", "files": files, "refs": refs, "base": base,
            "tmp": tmp}


SCHEDULE = [("y", (2, 8)), ("z", (1, 5)), (None, (3, 7)), ("y", (1, 12)), ("z", (2, 8)),
            (None, (1, 3))]


def test_onnxruntime_api_switches_adapters_in_one_session(served: dict[str, Any]) -> None:
    """ONNX Runtime's own API, as users write it: one session, adapters of ranks 2 and 6/3
    switched per run and back, no adapter = the exported one; dynamic batch and length."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(served["model"]), opts, providers=["CPUExecutionProvider"])
    adapters, run_options = {}, {}  # RunOptions does not keep its LoraAdapter alive: we do
    for name, path in served["files"].items():
        adapters[name] = ort.LoraAdapter()
        adapters[name].Load(str(path))
        run_options[name] = ort.RunOptions()
        run_options[name].add_active_adapter(adapters[name])
    for name, shape in SCHEDULE:
        ids = token_ids(*shape, seed=shape[1])
        (got,) = sess.run(None, {"input_ids": ids.numpy()}, run_options.get(name))
        want = logits(served["refs"][name], ids)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=str(name))


def test_adapters_really_differ(served: dict[str, Any]) -> None:
    """Guard against a vacuous pass: the three references are far apart."""
    ids = token_ids(2, 8)
    outs = [logits(served["refs"][k], ids) for k in (None, "y", "z")]
    assert min(np.abs(a - b).max() for i, a in enumerate(outs) for b in outs[i + 1:]) > 1e-2


def test_adapter_session_run_and_io_binding(served: dict[str, Any]) -> None:
    sess = AdapterSession(served["model"], ["CPUExecutionProvider"])
    for name, path in served["files"].items():
        loaded = sess.load(name, path)
        assert set(loaded.ranks.values()) == ({2} if name == "y" else {6, 3})
    assert sess.provider == "CPUExecutionProvider" and sess.device == ("cpu", 0)
    for name, shape in SCHEDULE:
        ids = token_ids(*shape, seed=shape[0] + 40)
        want = logits(served["refs"][name], ids)
        (got,) = sess.run({"input_ids": ids}, adapter=name)
        (bound,) = sess.run_bound([ids.numpy()], adapter=name)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=str(name))
        np.testing.assert_allclose(bound, want, rtol=0, atol=1e-4, err_msg=str(name))
    assert len(sess.latency({"input_ids": token_ids()}, "y", repeat=3, warmup=1)) == 3


def test_cuda_requested_but_absent_is_reported(served: dict[str, Any]) -> None:
    if runtime.cuda_driver_present():
        pytest.skip("a CUDA driver is present: see benchmarks/gpu_check.py")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sess = AdapterSession(served["model"], ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert sess.providers == ["CPUExecutionProvider"]
    assert any(issubclass(w.category, LoraFxWarning) and "CUDA" in str(w.message)
               for w in caught)


def test_foreign_and_partial_adapters_are_refused(served: dict[str, Any]) -> None:
    tmp, base = served["tmp"], served["base"]
    pm = peft_saved(base, tmp / "attn_only", seed=3, r=2, lora_alpha=2,
                    target_modules=["c_attn"])
    convert_adapter(tmp / "attn_only", tmp / "partial.onnx_adapter")  # no model: no check
    sess = AdapterSession(served["model"], ["CPUExecutionProvider"])
    with pytest.raises(LoraFxError, match="lacks .*c_fc.*fill zeros"):
        sess.load("partial", tmp / "partial.onnx_adapter")
    peft_saved(base, tmp / "proj", seed=4, r=2, lora_alpha=2, target_modules=["c_proj"])
    convert_adapter(tmp / "proj", tmp / "foreign.onnx_adapter")
    with pytest.raises(LoraFxError, match="Invalid input name"):
        sess.load("foreign", tmp / "foreign.onnx_adapter")
    with pytest.raises(LoraFxError, match="not loaded"):
        sess.run({"input_ids": token_ids()}, adapter="nope")
    # filled with zeros from the model: c_fc gets Δ = 0, so c_attn-only PEFT is the reference
    convert_adapter(tmp / "attn_only", tmp / "filled.onnx_adapter", model=served["model"])
    sess.load("filled", tmp / "filled.onnx_adapter")
    ids = token_ids(2, 8)
    np.testing.assert_allclose(sess.run([ids], "filled")[0], logits(pm, ids), atol=1e-4)


def test_cli_run_prints_outputs_provider_latency(served: dict[str, Any]) -> None:
    from lora_fx.cli.deploy import run_command as run

    ids = token_ids(2, 8, seed=77)
    np.save(served["tmp"] / "ids.npy", ids.numpy())
    result = CliRunner().invoke(run, [
        str(served["model"]), "--adapter", str(served["files"]["y"]), "--inputs",
        f"input_ids={served['tmp'] / 'ids.npy'}", "--repeat", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["provider"] == "CPUExecutionProvider" and data["inputs"] == {"input_ids": [2, 8]}
    assert [r["adapter"] for r in data["runs"]] == [None, "y"]
    for item, key in zip(data["runs"], (None, "y"), strict=True):
        out = item["outputs"][0]
        assert out["shape"] == [2, 8, 97] and item["latency_ms"]["repeat"] == 2
        want = logits(served["refs"][key], ids).ravel()[:6]
        np.testing.assert_allclose(out["head"], want, atol=1e-4)
    text = CliRunner().invoke(run, [str(served["model"]), "-i", "input_ids=rand:1x4:97",
                                    "--bind", "--repeat", "1"])
    assert text.exit_code == 0, text.output
    assert "CPUExecutionProvider (I/O binding)" in text.output and "latency" in text.output


@pytest.mark.parametrize("spec", ["input_ids=rand:2xq", "input_ids=nonsense", "nope=rand:2x8",
                                  "input_ids=missing.npy"])
def test_cli_run_refuses_bad_inputs(served: dict[str, Any], spec: str) -> None:
    from lora_fx.cli.deploy import run_command as run

    result = CliRunner().invoke(run, [str(served["model"]), "-i", spec])
    assert isinstance(result.exception, LoraFxError), result.output
