"""Verification that tells the truth on every provider (onnx.verify, ort.runtime).

No GPU here: the CUDA provider is simulated. ``onnxruntime.InferenceSession`` is replaced by a
recorder that opens the real CPU session but reports CUDA as its provider, so the tests check
what lorafx *asks* ONNX Runtime for (``use_tf32=0``), what it does when a build refuses the
option (TF32 stays on, the tolerance widens and the report says so), and that an error above
the tolerance is one line. bf16: ONNX Runtime's CPU provider has no bf16 kernels for MatMul,
Add, Mul, Softmax, ... (only data movement such as Identity, Transpose, Cast), so a bf16 model
export is reported unverified with a warning; bf16 *outputs* are checked through a graph the CPU
can run (Cast to bf16, Identity), which ``InferenceSession.run`` cannot return to numpy.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import lora_fx
from lora_fx.deploy_format import TF32_RTOL
from lora_fx.errors import LoraFxError, LoraFxWarning
from lora_fx.onnx.report import ExportReport
from lora_fx.onnx.verify import verify_file
from lora_fx.ort import runtime
from lora_fx.ort.serving import AdapterSession
from tests.helpers import ROOT, FakeCuda, run_cli, tiny_gpt2


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> type[FakeCuda]:
    FakeCuda.calls = []
    FakeCuda.refuse_tf32_option = False
    monkeypatch.setattr(runtime.ort, "InferenceSession", FakeCuda)
    monkeypatch.setattr(runtime, "default_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    return FakeCuda


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A merged tiny GPT-2 file, written once without verification, and PyTorch's outputs."""
    from lora_fx.onnx.verify import forward

    base = tiny_gpt2()
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    gm = lora_fx.inject(base, (ids,), lora_fx.LoraConfig(r=4, target_modules=["c_attn"]))
    path = tmp_path_factory.mktemp("v") / "m.onnx"
    lora_fx.export_onnx(gm, (ids,), path, verify=False)
    return {"path": path, "ids": ids, "want": forward(lora_fx.merge(gm), (ids,))}


def _report(path: Path) -> ExportReport:
    return ExportReport(path, True, 0.0, False, {})


def test_cuda_is_verified_with_tf32_off(exported: dict[str, Any],
                                        fake_cuda: type[FakeCuda]) -> None:
    report = _report(exported["path"])
    verify_file(report, (exported["ids"],), exported["want"])
    assert fake_cuda.calls == [[("CUDAExecutionProvider", {"use_tf32": "0"}),
                                "CPUExecutionProvider"]]
    info = report.extras["verification"]
    top = max(float(w.abs().max()) for w in exported["want"])
    assert info == {"provider": "CUDAExecutionProvider", "tf32": "off",
                    "tolerance": pytest.approx(1e-4 + 2e-5 * top),
                    "basis": f"0.0001 + 2e-05 x max|y| {top:.3g}"}


def test_explicit_cuda_options_are_kept(exported: dict[str, Any],
                                        fake_cuda: type[FakeCuda]) -> None:
    report = _report(exported["path"])
    verify_file(report, (exported["ids"],), exported["want"],
                providers=[("CUDAExecutionProvider", {"device_id": "0"})])
    assert fake_cuda.calls == [[("CUDAExecutionProvider", {"device_id": "0", "use_tf32": "0"})]]


def test_a_build_refusing_the_option_keeps_tf32_and_widens_the_tolerance(
        exported: dict[str, Any], fake_cuda: type[FakeCuda],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """TF32-sized differences pass under the TF32 tolerance, which the report names; a
    difference above it fails in one line that names its basis."""
    fake_cuda.refuse_tf32_option = True
    real_run = runtime.run_torch
    scale = max(1.0, max(float(w.abs().max()) for w in exported["want"]))
    noise = {"size": 1e-3 * scale}  # what TF32 did to a GPT-2-shaped model on an H200

    def noisy(sess: Any, inputs: Any) -> list[torch.Tensor]:
        return [t + noise["size"] for t in real_run(sess, inputs)]

    monkeypatch.setattr(runtime, "run_torch", noisy)
    report = _report(exported["path"])
    verify_file(report, (exported["ids"],), exported["want"])
    assert len(fake_cuda.calls) == 2 and fake_cuda.calls[1] == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    info = report.extras["verification"]
    assert info["tf32"] == "on" and info["basis"].startswith("TF32 on")
    top = max(float(w.abs().max()) for w in exported["want"])
    assert info["tolerance"] == pytest.approx(1e-4 + TF32_RTOL * top)
    noise["size"] = 3 * TF32_RTOL * scale
    with pytest.raises(LoraFxError, match=r"verification failed \(example\): .* \(TF32 on: .*\) "
                                          r"on CUDAExecutionProvider; .*do not deploy it"):
        verify_file(_report(exported["path"]), (exported["ids"],), exported["want"])


def test_cpu_sessions_are_not_given_cuda_options(exported: dict[str, Any],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    FakeCuda.calls = []
    monkeypatch.setattr(runtime.ort, "InferenceSession", FakeCuda)
    report = _report(exported["path"])
    verify_file(report, (exported["ids"],), exported["want"],
                providers=["CPUExecutionProvider"])
    assert FakeCuda.calls == [["CPUExecutionProvider"]]
    assert report.extras["verification"]["tf32"] is None


def _bf16_identity(path: Path) -> Path:
    """x (fp32) → Cast(bf16) → Identity → y (bf16): what the CPU provider can run in bf16."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["n", 3])
    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["c"], to=TensorProto.BFLOAT16),
                               helper.make_node("Identity", ["c"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                                ir_version=9), path)
    return path


def test_bf16_outputs_are_read_without_numpy_bf16(tmp_path: Path) -> None:
    path = _bf16_identity(tmp_path / "id.onnx")
    x = torch.randn(4, 3)
    sess = runtime.open_session(path, ["CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match="(?i)numpy"):
        sess.run(None, {"x": x.numpy()})  # what crashed verification on CUDA
    got = runtime.run_torch(sess, (x,))
    assert got[0].dtype == torch.bfloat16 and torch.equal(got[0], x.to(torch.bfloat16))
    report = _report(path)
    verify_file(report, (x,), [x], dtype="bf16")
    assert report.max_abs_diff is not None and 0 < report.max_abs_diff <= 2 ** -8 * 4
    assert report.extras["verification"]["basis"].startswith("bf16")
    served = AdapterSession(path, ["CPUExecutionProvider"]).run({"x": x.numpy()})
    assert served[0].dtype == np.float32
    np.testing.assert_array_equal(served[0], x.to(torch.bfloat16).float().numpy())


def test_bf16_model_on_the_cpu_is_reported_unverified_not_a_traceback(
        tmp_path: Path) -> None:
    base = tiny_gpt2()
    ids = torch.randint(0, 97, (2, 8))
    gm = lora_fx.inject(base, (ids,), lora_fx.LoraConfig(r=4, target_modules=["c_attn"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = lora_fx.export_onnx(gm, (ids,), tmp_path / "b.onnx", dtype="bf16",
                                     providers=["CPUExecutionProvider"])
    skipped = report.extras["verify_skipped"]  # ORT's status, or its reason alone
    assert "NOT_IMPLEMENTED" in skipped or "Could not find an implementation" in skipped
    assert any(issubclass(w.category, LoraFxWarning) and "not verified" in str(w.message)
               for w in caught)
    assert report.path.exists()


def test_cli_bf16_export_says_unverified_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    proc = run_cli("export", str(ROOT / "examples" / "tiny" / "model.py"), "--dtype", "bf16",
                   "-o", str(out), check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "not verified" in proc.stderr and out.exists()
