"""The pieces of the big-model export on a small model: external data, verification in ONNX
Runtime after the model's weights were released, the in-place merge of ``release=True``, a
consistent model/data pair when an export is replaced or killed, and the lean verification
session. The 2 GB run itself is ``benchmarks/bench_big_export.py``."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import lora_fx
from lora_fx import deploy_format
from lora_fx.api import export_onnx
from lora_fx.config import LoraConfig
from lora_fx.onnx import export as onnx_export
from lora_fx.onnx import forms as onnx_forms
from lora_fx.onnx import save
from lora_fx.onnx.report import op_histogram
from lora_fx.onnx.verify import forward, verify_file
from lora_fx.ort import runtime
from tests.helpers import factors, injected_gpt3_small, lora_scale, randomize_lora, token_ids


def test_external_data_export_verified_after_release(tmp_path: Any, monkeypatch: Any) -> None:
    """The big-model path on a small model: external data forced, ONNX Runtime verifies the file
    against outputs computed before the model was released; the op histogram comes from the
    exporter's IR (no serialization of the weights) and equals the saved file's."""
    monkeypatch.setattr(deploy_format, "EXTERNAL_DATA_BYTES", 0)
    base, gm, ids = injected_gpt3_small()
    merged = lora_fx.merge(gm, inplace=True)
    path = tmp_path / "model.onnx"
    report = export_onnx(merged, (ids,), path, verify=False)
    data = [f for f in tmp_path.iterdir() if f.name.endswith(".data")]
    assert report.external_data and len(data) == 1 and data[0].stat().st_size > 0
    assert data[0].name.startswith("model.onnx.")  # model.onnx.<8 hex>.data
    want = forward(merged, (ids,))
    alive = weakref.ref(base.blocks[0].attn.q_proj.weight)
    del base, gm, merged
    gc.collect()
    assert alive() is None  # no PyTorch copy of the weights is left while ONNX Runtime runs
    verify_file(report, (ids,), want)
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    saved = onnx.load(str(path), load_external_data=False)
    assert report.op_histogram == dict(op_histogram(saved))



def test_export_release_frees_weights_then_verifies(tmp_path: Any, monkeypatch: Any) -> None:
    """export_onnx(release=True): verified in ONNX Runtime after the model's weights were freed;
    the file also matches an independent copy-merge computed before the in-place fold."""
    monkeypatch.setattr(deploy_format, "EXTERNAL_DATA_BYTES", 0)
    base, gm, ids = injected_gpt3_small(seed=5)
    with torch.no_grad():
        want = lora_fx.merge(gm)(ids)
    merged = lora_fx.merge(gm, inplace=True)
    report = onnx_export.export_onnx(merged, (ids,), tmp_path / "m.onnx", release=True)
    assert report.external_data and report.max_abs_diff is not None
    assert report.max_abs_diff <= 1e-4
    assert base.blocks[0].attn.q_proj.weight.numel() == 0  # freed: the model is consumed
    got = runtime.run(runtime.open_session(tmp_path / "m.onnx"), (ids,))
    assert runtime.max_abs_diff(got, [want]) <= 1e-4



def test_external_data_replace_keeps_a_consistent_pair(tmp_path: Any, monkeypatch: Any) -> None:
    """Exporting over a model with external data: each export writes its own data file, so the
    previous model keeps its data until the new model is in place; then the old data file goes.
    Killed between the two renames (simulated), the previous model still loads and runs."""
    monkeypatch.setattr(deploy_format, "EXTERNAL_DATA_BYTES", 0)
    base, gm, ids = injected_gpt3_small(seed=7)
    path = tmp_path / "model.onnx"
    onnx_export.export_onnx(base, (ids,), path, verify=False)
    first = {f.name for f in tmp_path.iterdir()}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: ids.numpy()}
    before = sess.run(None, feed)[0]
    del sess

    real_replace = os.replace
    calls: list[str] = []

    def dies_before_model(src: Any, dst: Any) -> None:
        calls.append(Path(dst).name)
        if Path(dst).name == "model.onnx":
            raise KeyboardInterrupt  # the process is killed between the two renames
        real_replace(src, dst)

    monkeypatch.setattr(save.os, "replace", dies_before_model)
    merged = lora_fx.merge(gm)
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_onnx(merged, (ids,), path, verify=False)
    monkeypatch.setattr(save.os, "replace", real_replace)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, feed)[0], before)  # old model, old data
    del sess

    orphan = next(n for n in calls if n.endswith(".data"))  # the killed export's data
    assert (tmp_path / orphan).exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    killed = tmp_path / f"model.onnx.{dead}.0123abcd.data"  # an export killed in another process
    killed.write_bytes(b"partial")
    report = onnx_export.export_onnx(merged, (ids,), path)  # a clean export replaces it
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    old_data = {n for n in first if n.endswith(".data")}
    left = {f.name for f in tmp_path.iterdir() if f.name.endswith(".data")}
    assert not old_data & left  # the replaced model's data file was deleted
    assert not killed.exists()  # a dead process's unreferenced data file was swept
    assert orphan in left  # this (live) process's own: not a dead export's, kept



def test_lean_session_holds_weights_once(tmp_path: Any) -> None:
    """The verification session of release=True: no weight prepacking, no memory arena; the
    same outputs as a default session."""
    _, gm, ids = injected_gpt3_small(seed=9)
    path = tmp_path / "m.onnx"
    onnx_export.export_onnx(gm, (ids,), path, verify=False)
    lean = runtime.open_session(path, ["CPUExecutionProvider"], lean=True)
    opts = lean.get_session_options()
    assert opts.get_session_config_entry("session.disable_prepacking") == "1"
    assert not opts.enable_cpu_mem_arena
    default = runtime.open_session(path, ["CPUExecutionProvider"])
    np.testing.assert_array_equal(runtime.run(lean, (ids,))[0], runtime.run(default, (ids,))[0])



def _optimized_initializer_shapes(path: Path, lean: bool, tmp: Path) -> tuple[set[tuple[int, ...]],
                                                                           list[Any]]:
    """(initializer shapes, FusedMatMul nodes) of the graph ONNX Runtime runs for ``path``
    under open_session's options (saved through ``optimized_model_filepath``)."""
    opts, disabled = runtime.session_options(lean=lean)
    out = tmp / f"optimized_{lean}.onnx"
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                         disabled_optimizers=disabled)
    model = onnx.load(str(out))
    return ({tuple(t.dims) for t in model.graph.initializer},
            [n for n in model.graph.node if n.op_type == "FusedMatMul"])



def test_lean_session_reads_a_tied_head_without_a_transposed_copy(tmp_path: Path) -> None:
    """A tied LM head is MatMul(x, Transpose(wte)) in the file. A default session folds the
    transpose into a second [d, vocab] weight; the lean one (verification of big exports)
    runs FusedMatMul(x, wte, transB=1) on the one stored weight, with the same outputs."""
    torch.manual_seed(0)  # vocab · d > 8192: onnxscript leaves the transpose to the runtime
    base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=300,
                                      n_positions=32, use_cache=False)).eval()
    ids = token_ids()
    gm = lora_fx.inject(base, (ids,), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    randomize_lora(gm, seed=2)
    path = tmp_path / "m.onnx"
    onnx_export.export_onnx(gm, (ids,), path, verify=False)
    vocab, d = base.config.vocab_size, base.config.n_embd
    shapes, _ = _optimized_initializer_shapes(path, False, tmp_path)
    assert (d, vocab) in shapes  # the folded transposed copy
    shapes, fused = _optimized_initializer_shapes(path, True, tmp_path)
    assert (d, vocab) not in shapes and (vocab, d) in shapes
    assert any(a.name == "transB" and a.i == 1 for n in fused for a in n.attribute)
    lean = runtime.open_session(path, ["CPUExecutionProvider"], lean=True)
    default = runtime.open_session(path, ["CPUExecutionProvider"])
    np.testing.assert_allclose(runtime.run(lean, (ids,))[0], runtime.run(default, (ids,))[0],
                               atol=1e-5, rtol=1e-5)



def test_export_release_merges_in_place(tmp_path: Any, monkeypatch: Any) -> None:
    """export_onnx(gm, release=True) (what `lorafx export` runs) folds W' into the user's own
    weight tensors (no second copy) before freeing them: W' = W + s·B@A by hand, same storage."""
    monkeypatch.setattr(onnx_forms, "release_weights", lambda *modules: None)  # look after
    base, gm, ids = injected_gpt3_small(seed=11)
    weight = base.blocks[0].attn.q_proj.weight
    ptr, w0 = weight.data_ptr(), weight.detach().clone()
    a, b = factors(gm, "blocks.0.attn.q_proj")
    delta = lora_scale(8, 4) * b @ a  # nn.Linear: W [out, in]
    report = onnx_export.export_onnx(gm, (ids,), tmp_path / "m.onnx", release=True)
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    assert weight.data_ptr() == ptr
    torch.testing.assert_close(weight.detach(), w0 + delta, atol=1e-6, rtol=1e-6)

