"""lora_fx.onnx.stream: the streamed file parses to exactly what onnx_ir.save writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lora_fx
from lora_fx.onnx.stream import _varint, write_model
from lora_fx.onnx.trace import to_onnx
from lora_fx.ort import runtime
from tests.helpers import randomize_lora, tiny_gpt2, tmpfs, token_ids


def _canonical(model: onnx.ModelProto) -> tuple[bytes, dict[str, bytes]]:
    """The model without initializers, and each initializer's bytes by name."""
    inits = {t.name: t.SerializeToString() for t in model.graph.initializer}
    rest = onnx.ModelProto()
    rest.CopyFrom(model)
    del rest.graph.initializer[:]
    return rest.SerializeToString(), inits


def _mixed_model() -> ir.Model:
    """out = x + Σ cast(w_i): weights of several dtypes and shapes, a 0-d and an empty one."""
    g = np.random.default_rng(0)
    weights = {
        "w_f32": g.standard_normal((3, 4)).astype(np.float32),
        "w_f16": g.standard_normal((3, 4)).astype(np.float16),
        "w_i64": g.integers(-5, 5, (3, 4)).astype(np.int64),
        "w_bool": g.integers(0, 2, (3, 4)).astype(bool),
        "w_scalar": np.array(2.5, dtype=np.float32),
        "w_empty": np.zeros((0, 4), dtype=np.float32),
    }
    nodes, acc = [], "x"
    for i, name in enumerate(n for n in weights if n != "w_empty"):
        nodes.append(helper.make_node("Cast", [name], [f"c{i}"], to=TensorProto.FLOAT))
        nodes.append(helper.make_node("Add", [acc, f"c{i}"], [f"a{i}"]))
        acc = f"a{i}"
    nodes.append(helper.make_node("Concat", ["w_empty", acc], ["out"], axis=0))
    graph = helper.make_graph(
        nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [3, 4])],
        [numpy_helper.from_array(a, n) for n, a in weights.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return ir.serde.deserialize_model(proto)


def test_varint_matches_protobuf() -> None:
    for n in (0, 1, 127, 128, 300, 2**31, 2**40 + 7):
        t = onnx.TensorProto(dims=[n])  # field 1, varint: tag 0x08, varint(n)
        assert t.SerializeToString() == b"\x08" + _varint(n)


def test_mixed_dtypes_equal_ir_save(tmp_path: Path) -> None:
    model = _mixed_model()
    ir.save(model, tmp_path / "ref.onnx")
    write_model(model, tmp_path / "streamed.onnx")
    ref, got = onnx.load(tmp_path / "ref.onnx"), onnx.load(tmp_path / "streamed.onnx")
    assert _canonical(got) == _canonical(ref)
    onnx.checker.check_model(got)
    ir.save(model, tmp_path / "again.onnx")  # the model itself is left as it was
    assert _canonical(onnx.load(tmp_path / "again.onnx")) == _canonical(ref)
    x = np.ones((3, 4), dtype=np.float32)
    outs = [runtime.run(runtime.open_session(tmp_path / f), (x,))[0]
            for f in ("ref.onnx", "streamed.onnx")]
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_other_dtypes_roundtrip(tmp_path: Path, dtype: torch.dtype) -> None:
    t = torch.randn(5, 3).to(dtype)
    model = ir.Model(ir.Graph([], [], nodes=[], initializers=[
        ir.Value(name="w", const_value=ir.tensor(t))], opset_imports={"": 17}), ir_version=9)
    ir.save(model, tmp_path / "ref.onnx")
    write_model(model, tmp_path / "streamed.onnx")
    assert _canonical(onnx.load(tmp_path / "streamed.onnx")) == \
        _canonical(onnx.load(tmp_path / "ref.onnx"))


def test_gpt2_export_equals_ir_save(tmp_path: Path) -> None:
    base = tiny_gpt2()
    gm = lora_fx.capture(base, (token_ids(),))
    program = to_onnx(gm, (token_ids(),), ({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},))
    program.save(str(tmp_path / "ref.onnx"))
    write_model(program.model, tmp_path / "streamed.onnx")
    assert _canonical(onnx.load(tmp_path / "streamed.onnx")) == \
        _canonical(onnx.load(tmp_path / "ref.onnx"))


def test_streamed_save_on_a_full_disk_keeps_previous(tmp_path: Path) -> None:
    """save_program streams into a temporary file: ENOSPC is one LoraFxError, nothing left."""
    from lora_fx.errors import LoraFxError
    from lora_fx.onnx.save import save_program

    with tmpfs(tmp_path / "full", "256k") as mnt:
        program = to_onnx(lora_fx.capture(tiny_gpt2(), (token_ids(),)), (token_ids(),))
        assert isinstance(program, torch.onnx.ONNXProgram)  # the streamed path
        target = mnt / "model.onnx"
        target.write_bytes(b"previous")
        with pytest.raises(LoraFxError, match="No space left on device"):
            save_program(program, target)
        assert target.read_bytes() == b"previous"
        assert sorted(p.name for p in mnt.iterdir()) == ["model.onnx"]


def test_external_view_reads_the_streamed_file_in_place(tmp_path: Path) -> None:
    """The view's weights are external data at offsets into the streamed file itself: onnx's
    own loader resolves them to exactly the file's tensors, and ONNX Runtime agrees."""
    from lora_fx.onnx.stream import external_view

    streamed = tmp_path / "streamed.onnx"
    layout = write_model(_mixed_model(), streamed)
    (tmp_path / "view.onnx").write_bytes(external_view(layout, streamed, inline_below=1))
    view = onnx.load(tmp_path / "view.onnx", load_external_data=False)
    external = {t.name: {e.key: e.value for e in t.external_data} for t in view.graph.initializer
                if t.data_location == TensorProto.EXTERNAL}
    assert set(external) == {"w_f32", "w_f16", "w_i64", "w_bool", "w_scalar"}  # not w_empty
    assert {e["location"] for e in external.values()} == {"streamed.onnx"}
    resolved = onnx.load(tmp_path / "view.onnx")  # marks data_location DEFAULT explicitly
    for t in resolved.graph.initializer:
        t.ClearField("data_location")
    assert _canonical(resolved) == _canonical(onnx.load(streamed))
    x = np.ones((3, 4), dtype=np.float32)
    outs = [runtime.run(runtime.open_session(tmp_path / f), (x,))[0]
            for f in ("streamed.onnx", "view.onnx")]
    np.testing.assert_array_equal(outs[0], outs[1])


MAPPED_CHILD = r"""
import json, sys
from pathlib import Path
import numpy as np
from lora_fx.ort import runtime
from lora_fx.onnx.verify import _loadable
from lora_fx.onnx.stream import Layout

def anon():
    return int(Path("/proc/self/status").read_text().split("RssAnon:")[1].split()[0]) * 1024

path, mode = Path(sys.argv[1]), sys.argv[2]
raw = json.loads(path.with_suffix(".json").read_text())
tensors = [(bytes.fromhex(h), o, n) for h, o, n in raw["tensors"]]
layout = Layout(bytes.fromhex(raw["head"]), tensors)
x = np.ones((1, 1024), dtype=np.float32)
before = anon()
with _loadable(path, layout if mode == "view" else None) as f:
    sess = runtime.open_session(f, ["CPUExecutionProvider"], lean=True)
y = runtime.run(sess, (x,))[0]
print(anon() - before, float(np.abs(y).sum()))
"""


def _chain(n: int, d: int) -> ir.Model:
    """y = x @ w0 @ w1 ... @ w(n-1): n weights of d x d floats."""
    g = np.random.default_rng(0)
    weights = [numpy_helper.from_array(g.standard_normal((d, d)).astype(np.float32) / 32,
                                       f"w{i}") for i in range(n)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"], [f"h{i + 1}"])
             for i in range(n)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", 1, [1, d])],
                              [helper.make_tensor_value_info(f"h{n}", 1, [1, d])], weights)
    return ir.serde.deserialize_model(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_verification_maps_a_streamed_file_instead_of_copying_it(tmp_path: Path) -> None:
    """Through the view, ONNX Runtime's session holds the weights as mapped file pages: its
    anonymous memory grows by a small part of the weights (opened directly: all of them)."""
    import json
    import subprocess
    import sys

    n, d = 40, 1024  # 160 MB
    layout = write_model(_chain(n, d), tmp_path / "chain.onnx")
    (tmp_path / "chain.json").write_text(json.dumps({"head": layout.head.hex(), "tensors": [
        [h.hex(), o, length] for h, o, length in layout.tensors]}))
    got = {}
    for mode in ("view", "direct"):  # each in a fresh process: a clean heap to measure
        out = subprocess.run([sys.executable, "-c", MAPPED_CHILD, str(tmp_path / "chain.onnx"),
                              mode], capture_output=True, text=True, check=True).stdout.split()
        got[mode] = (int(out[0]) / (n * d * d * 4), out[1])
    assert got["view"][1] == got["direct"][1]  # same outputs
    assert got["view"][0] < 0.25, got
    assert got["direct"][0] > 0.75, got


def test_export_verifies_through_a_temporary_view(tmp_path: Path, monkeypatch: Any) -> None:
    """export_onnx(verify=True) of a single-file model opens a view beside it (weights external,
    pointing into the model file), removes it, and reports errors with the model's own path."""
    from lora_fx.api import export_onnx
    from lora_fx.errors import LoraFxError

    gm = lora_fx.inject(tiny_gpt2(), (token_ids(),), lora_fx.LoraConfig(r=2, target_modules=[
        "c_attn"]))
    randomize_lora(gm)  # B != 0: the verified file holds merged weights that differ from W
    opened: list[Path] = []
    real = runtime.open_session

    def spy(path: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(path))
        locations = {e.value for t in onnx.load(path, load_external_data=False).graph.initializer
                     for e in t.external_data if e.key == "location"}
        assert locations == {"m.onnx"}
        return real(path, *args, **kwargs)

    monkeypatch.setattr(runtime, "open_session", spy)
    report = export_onnx(gm, (token_ids(),), tmp_path / "m.onnx", verify=True)
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    assert len(opened) == 1 and opened[0].parent == tmp_path and opened[0].name.endswith(".tmp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]

    def broken(path: Any, *args: Any, **kwargs: Any) -> Any:
        raise LoraFxError(f"ONNX Runtime cannot load {path}: broken")

    monkeypatch.setattr(runtime, "open_session", broken)
    with pytest.raises(LoraFxError, match=r"cannot load .*m\.onnx: broken") as err:
        export_onnx(gm, (token_ids(),), tmp_path / "m.onnx", verify=True)
    assert ".tmp" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
