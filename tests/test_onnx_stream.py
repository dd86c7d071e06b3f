"""lora_fx.onnx_stream: the streamed file parses to exactly what onnx_ir.save writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from conftest import tiny_gpt2, tmpfs, token_ids
from onnx import TensorProto, helper, numpy_helper

import lora_fx
from lora_fx import runtime
from lora_fx.onnx_export import to_onnx
from lora_fx.onnx_stream import _varint, write_model


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
    from lora_fx.onnx_export import save_program

    with tmpfs(tmp_path / "full", "256k") as mnt:
        program = to_onnx(lora_fx.capture(tiny_gpt2(), (token_ids(),)), (token_ids(),))
        assert isinstance(program, torch.onnx.ONNXProgram)  # the streamed path
        target = mnt / "model.onnx"
        target.write_bytes(b"previous")
        with pytest.raises(LoraFxError, match="No space left on device"):
            save_program(program, target)
        assert target.read_bytes() == b"previous"
        assert sorted(p.name for p in mnt.iterdir()) == ["model.onnx"]
