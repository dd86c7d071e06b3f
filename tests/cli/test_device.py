"""The CLI on the GPU: ``--device``/``--dtype``/``--adapter-dtype``/``--autocast`` and
``run --provider cuda``. This machine has no GPU: CUDA's absence must give one clean line
(exit 1, no traceback); the CUDA paths are exercised with a monkeypatched availability check
(PyTorch) and a simulated CUDA session (ONNX Runtime), and bf16 training with CPU autocast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper
from safetensors import safe_open

from lora_fx.cli.main import cli
from lora_fx.errors import LoraFxError
from lora_fx.load import device as placement
from lora_fx.ort import runtime
from tests.helpers import ROOT, FakeCuda, run_cli

TINY = str(ROOT / "examples" / "tiny" / "model.py")


def _identity_onnx(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                                ir_version=9), path)
    return path


def _one_clean_line(proc: Any, words: str) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", [
    ["inject", TINY, "-t", "w_in", "-o", "{tmp}/a"],
    ["train", TINY, "--adapter", "{tmp}/a", "--steps", "1"],
    ["export", TINY, "-o", "{tmp}/m.onnx"],
])
def test_device_cuda_without_cuda_is_one_line(tmp_path: Path, command: list[str]) -> None:
    args = [a.format(tmp=tmp_path) for a in command]
    _one_clean_line(run_cli(*args, "--device", "cuda", check=False), "--device cuda: ")


def test_run_provider_cuda_without_cuda_is_one_line(tmp_path: Path) -> None:
    if "CUDAExecutionProvider" in runtime.available_providers() and \
            runtime.cuda_driver_present():
        pytest.skip("this machine has CUDA")
    model = _identity_onnx(tmp_path / "r.onnx")
    _one_clean_line(run_cli("run", str(model), "--provider", "cuda", check=False),
                    "CUDA requested")


def test_device_is_checked_against_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert placement.resolve_device("cuda") == torch.device("cuda")
    assert placement.resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(LoraFxError, match="--device cuda:3: only 1 CUDA device"):
        placement.resolve_device("cuda:3")
    with pytest.raises(LoraFxError, match="not a device: use cpu, cuda or cuda:N"):
        placement.resolve_device("tpu9")
    assert placement.resolve_device(None) is None


def test_place_moves_module_and_inputs_before_capture() -> None:
    """``place`` on the meta device (standing in for the GPU): the model and its example
    inputs move and are cast, so that the capture bakes that device."""
    import lora_fx
    from lora_fx.load.model import load_model

    loaded = placement.place(load_model(TINY), torch.device("meta"), torch.bfloat16)
    assert {p.device.type for p in loaded.module.parameters()} == {"meta"}
    assert loaded.example_inputs[0].device.type == "meta"
    assert loaded.example_inputs[0].dtype == torch.bfloat16
    gm = lora_fx.inject(loaded.module, loaded.example_inputs,
                        lora_fx.LoraConfig(r=2, target_modules=["w_in"]))
    assert {p.dtype for p in lora_fx.lora_parameters(gm)} == {torch.float32}
    assert {p.device.type for p in lora_fx.lora_parameters(gm)} == {"meta"}


def test_run_provider_cuda_uses_cuda_where_offered(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """With CUDA offered (simulated), ``run --provider cuda`` asks for it and reports it."""

    FakeCuda.calls, FakeCuda.refuse_tf32_option = [], False
    monkeypatch.setattr(runtime.ort, "InferenceSession", FakeCuda)
    monkeypatch.setattr(runtime, "available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(runtime, "cuda_driver_present", lambda: True)
    model = _identity_onnx(tmp_path / "r.onnx")
    result = CliRunner().invoke(cli, ["run", str(model), "--provider", "cuda", "--repeat", "1",
                                      "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["provider"] == "CUDAExecutionProvider"
    assert FakeCuda.calls[0][0] == "CUDAExecutionProvider"


def _dtypes(adapter: Path) -> set[torch.dtype]:
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 - safe_open API


def test_bf16_base_inject_and_train_with_autocast(tmp_path: Path) -> None:
    """inject on a bf16 base keeps fp32 factors (``--adapter-dtype fp32``, PEFT's default) or
    bf16 ones (``base``); train runs bf16 (cast base, fp32 masters) and fp32 base under bf16
    autocast, and saves the factors in their dtype."""
    ad, low = tmp_path / "a", tmp_path / "b"
    run_cli("inject", TINY, "-t", "w_in", "-t", "head", "--dtype", "bf16", "-o", str(ad),
            "--device", "cpu")
    run_cli("inject", TINY, "-t", "w_in", "--dtype", "bf16", "--adapter-dtype", "base", "-o",
            str(low))
    assert _dtypes(ad) == {torch.float32} and _dtypes(low) == {torch.bfloat16}
    for extra in (["--dtype", "bf16"], ["--autocast", "bf16"]):
        out = run_cli("train", TINY, "--adapter", str(ad), "--steps", "3", "--json",
                      "--device", "cpu", *extra)
        report = json.loads(out.stdout)
        assert report["steps"] == 3 and report["final_loss"] == report["final_loss"]  # finite
        assert _dtypes(ad) == {torch.float32}
