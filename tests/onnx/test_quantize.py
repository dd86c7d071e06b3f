"""Weight-only quantization (``onnx.quantize``): base MatMuls become MatMulNBits through ONNX
Runtime's quantizer, the LoRA adapter inputs stay float, graph inputs and overridable.

References: hand-built graphs run in ONNX Runtime, float against quantized, and the adapter's
own algebra: with y = x·Ŵ + (x·A')·B', two adapters differ by exactly x·(A₂'B₂' − A₁'B₁')
whatever Ŵ's rounding. Bounds on quantized against float outputs are relative norms,
|y_q − y| / |y|, loose: int4 blocks of 32 (symmetric RTN, step max|w| / 8 per block) measured
0.09 after one Gaussian layer, 0.13 after two and 0.20 on the logits of a 2-layer LLaMA whose
tied table is int4 too; int8 0.005-0.009. Bounds: 0.25 and 0.02.
Real files: lorafx's unmerged, mixed-batch and KV-cache exports of a tiny LLaMA.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lora_fx.errors import LoraFxError
from lora_fx.onnx.quantize import quantize, quantize_file

A, B = ".lora_A.weight", ".lora_B.weight"
D_IN, D_OUT, D_HEAD, R = 64, 48, 32, 4
INT4_RTOL, INT8_RTOL = 0.25, 0.02


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def tensor(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name)


def lora_graph(seed: int = 0) -> onnx.ModelProto:
    """y = x·W1 + (x·A')·B' (the unmerged form: A', B' initializers that are also inputs),
    z = y·W2; some nodes unnamed."""
    g = rng(seed)
    site = "layers.0.proj"
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="base"),
             helper.make_node("MatMul", ["x", site + A], ["t"]),
             helper.make_node("MatMul", ["t", site + B], ["d"], name="lora_delta"),
             helper.make_node("Add", ["h", "d"], ["y"]),
             helper.make_node("MatMul", ["y", "W2"], ["z"])]
    inits = [tensor("W1", g.standard_normal((D_IN, D_OUT))),
             tensor("W2", g.standard_normal((D_OUT, D_HEAD))),
             tensor(site + A, g.standard_normal((D_IN, R)) * 0.3),
             tensor(site + B, g.standard_normal((R, D_OUT)) * 0.3)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", D_IN]),
              helper.make_tensor_value_info(site + A, TensorProto.FLOAT, [D_IN, R]),
              helper.make_tensor_value_info(site + B, TensorProto.FLOAT, [R, D_OUT])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z")]
    return model_of(helper.make_graph(nodes, "lora", inputs, outputs, inits))


def model_of(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    return model


def session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("bits,rtol", [(4, INT4_RTOL), (8, INT8_RTOL)])
def test_base_matmuls_quantized_lora_inputs_kept(bits: int, rtol: float) -> None:
    fp32 = lora_graph()
    q = quantize(fp32, bits=bits)
    assert ops(q)["MatMulNBits"] == 2 and ops(q)["MatMul"] == 2  # W1, W2 / the branch
    for node in q.graph.node:
        if node.op_type == "MatMul":
            assert node.input[1].endswith((A, B))
        if node.op_type == "MatMulNBits":
            assert {a.name: a.i for a in node.attribute}["bits"] == bits
    site = "layers.0.proj"
    assert [i.name for i in q.graph.input] == ["x", site + A, site + B]
    before, after = inits(fp32), inits(q)
    for name in (site + A, site + B):  # unquantized, bit for bit
        assert after[name].dtype == np.float32 and np.array_equal(after[name], before[name])
    assert "W1" not in after and "W2" not in after
    assert [t.name for t in fp32.graph.initializer][:2] == ["W1", "W2"]  # the input untouched
    x = rng(1).standard_normal((2, 5, D_IN)).astype(np.float32)
    want = session(fp32).run(None, {"x": x})
    got = session(q).run(None, {"x": x})
    assert rel(got[1], want[1]) < rtol


def test_fp16_files() -> None:
    """An fp16 file (weights, inputs, outputs): fp16 scales, fp16 outputs, A', B' fp16 still."""
    fp16 = lora_graph()
    for t in fp16.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in [*fp16.graph.input, *fp16.graph.output]:
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.FLOAT16
    q = quantize(fp16, accuracy_level=4)
    assert ops(q)["MatMulNBits"] == 2
    assert {t.name: t.data_type for t in q.graph.initializer}["layers.0.proj" + A] == \
        TensorProto.FLOAT16
    x = rng(1).standard_normal((2, 5, D_IN)).astype(np.float16)
    got, want = session(q).run(None, {"x": x})[1], session(fp16).run(None, {"x": x})[1]
    assert got.dtype == np.float16
    assert rel(got.astype(np.float32), want.astype(np.float32)) < INT4_RTOL


def test_adapter_inputs_swap_exactly_on_the_int4_file() -> None:
    """Feeding A₂', B₂' in place of the defaults changes y by x·(A₂'B₂' − A₁'B₁'): the base's
    rounding cancels, so the adapter acts exactly as on the float file."""
    fp32 = lora_graph()
    q = quantize(fp32, bits=4)
    site = "layers.0.proj"
    g = rng(2)
    x = g.standard_normal((2, 5, D_IN)).astype(np.float32)
    a2 = (g.standard_normal((D_IN, R)) * 0.3).astype(np.float32)
    b2 = (g.standard_normal((R, D_OUT)) * 0.3).astype(np.float32)
    a1, b1 = inits(fp32)[site + A], inits(fp32)[site + B]
    s = session(q)
    y1 = s.run(["y"], {"x": x})[0]
    y2 = s.run(["y"], {"x": x, site + A: a2, site + B: b2})[0]
    want = x.astype(np.float64) @ (a2.astype(np.float64) @ b2 - a1.astype(np.float64) @ b1)
    np.testing.assert_allclose(y2 - y1, want, atol=1e-4, rtol=1e-4)
    zero = s.run(["y"], {"x": x, site + A: np.zeros_like(a1), site + B: np.zeros_like(b1)})[0]
    np.testing.assert_allclose(y1 - zero, x.astype(np.float64) @ (a1.astype(np.float64) @ b1),
                               atol=1e-4, rtol=1e-4)


def test_keep_and_onnx_ir_models() -> None:
    """A weight named in ``keep`` stays MatMul; an onnx_ir model comes back as one."""
    q = quantize(ir.from_proto(lora_graph()), keep={"W2"})
    assert isinstance(q, ir.Model)
    histogram = Counter(n.op_type for n in q.graph)
    assert histogram["MatMulNBits"] == 1 and histogram["MatMul"] == 3
    assert "W2" in q.graph.initializers


def test_a_weight_read_twice_is_quantized_once() -> None:
    g = rng(3)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y1"], name="first"),
             helper.make_node("MatMul", ["x", "W"], ["y2"], name="second")]
    graph = helper.make_graph(
        nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, D_IN])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y1", "y2")],
        [tensor("W", g.standard_normal((D_IN, D_OUT)))])
    q = quantize(model_of(graph))
    assert ops(q) == {"MatMulNBits": 2}
    assert len({n.input[1] for n in q.graph.node}) == 1 and len(q.graph.initializer) == 2
    y1, y2 = session(q).run(None, {"x": g.standard_normal((3, D_IN)).astype(np.float32)})
    assert np.array_equal(y1, y2)


def tied_graph(vocab: int = 50, hidden: int = 40) -> onnx.ModelProto:
    """An embedding Gather(E, ids) and a tied head MatMul(h, Transpose(E)) (as exported),
    ``hidden`` not a multiple of the block, and a position table P Gather(P, pos)."""
    g = rng(4)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], name="embed"),
             helper.make_node("Gather", ["P", "pos"], ["p"], name="positions"),
             helper.make_node("Add", ["e", "p"], ["h"]),
             helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "Et"], ["logits"], name="head")]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3]),
                        helper.make_tensor_value_info("pos", TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("e", "logits")],
        [tensor("E", g.standard_normal((vocab, hidden))),
         tensor("P", g.standard_normal((8, hidden)))])
    return model_of(graph)


def test_tied_embedding_reads_the_heads_int4_blocks() -> None:
    """The builder's shared embeddings: one int4 copy of E; each embedded row is the head's
    dequantized column (MatMulNBits of a one-hot row), exactly."""
    vocab, hidden = 50, 40
    fp32 = tied_graph(vocab, hidden)
    q = quantize(fp32)
    assert ops(q)["GatherBlockQuantized"] == 1 and ops(q)["MatMulNBits"] == 1
    assert ops(q)["Gather"] == 1 and ops(q)["Transpose"] == 0  # P stays float ("tied")
    assert "E" not in inits(q)
    stored = [t for t in q.graph.initializer if t.data_type == TensorProto.FLOAT]
    assert {t.name for t in stored} == {"P", next(n.input[2] for n in q.graph.node
                                                  if n.op_type == "MatMulNBits")}
    ids = np.array([[0, 7, 49], [3, 3, 12]])
    pos = np.zeros((2, 3), dtype=np.int64)
    s = session(q)
    e, _ = s.run(None, {"ids": ids, "pos": pos})
    # one-hot rows through the int4 head: logits[v] = Σ_k e_k Ê[v, k], so with e = unit
    # vector k, logits = column k of Êᵀ; stacking all k gives Ê itself
    head = q.graph.node[[n.op_type for n in q.graph.node].index("MatMulNBits")]
    probe = onnx.ModelProto()
    probe.CopyFrom(q)
    del probe.graph.node[:]
    probe.graph.node.append(helper.make_node("MatMulNBits", ["u", *head.input[1:]], ["out"],
                                             domain="com.microsoft", name="probe"))
    probe.graph.node[0].attribute.extend(head.attribute)
    del probe.graph.input[:], probe.graph.output[:]
    probe.graph.input.append(helper.make_tensor_value_info("u", TensorProto.FLOAT, None))
    probe.graph.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, None))
    table = session(probe).run(None, {"u": np.eye(hidden, dtype=np.float32)})[0].T  # Ê
    np.testing.assert_array_equal(e, table[ids])
    want = inits(fp32)["E"]
    assert rel(table, want) < INT4_RTOL


def test_embeddings_none_and_all() -> None:
    none = quantize(tied_graph(), embeddings="none")
    assert ops(none)["Gather"] == 2 and ops(none)["MatMulNBits"] == 1 and "E" in inits(none)
    every = quantize(tied_graph(), embeddings="all")
    assert ops(every)["GatherBlockQuantized"] == 2 and ops(every)["Gather"] == 0
    assert {o.domain: o.version for o in every.opset_import}[""] == 21  # int4 tables
    ids = np.array([[0, 7, 49], [3, 3, 12]])
    pos = np.array([[0, 1, 2], [5, 6, 7]])
    want = session(tied_graph()).run(None, {"ids": ids, "pos": pos})
    got = session(every).run(None, {"ids": ids, "pos": pos})
    assert rel(got[0], want[0]) < INT4_RTOL and rel(got[1], want[1]) < INT4_RTOL
    int8 = quantize(tied_graph(), bits=8)  # no int8 table: E stays float beside an int8 head
    assert ops(int8)["Gather"] == 2 and ops(int8)["MatMulNBits"] == 1


@pytest.mark.parametrize("method,bits,rtol", [
    ("rtn", 4, INT4_RTOL), ("kquant", 4, INT4_RTOL), ("hqq", 4, INT4_RTOL),
    ("rtn", 8, INT8_RTOL), ("kquant", 8, INT8_RTOL)])
def test_other_methods_leave_the_adapter_alone(method: str, bits: int, rtol: float) -> None:
    fp32 = lora_graph()
    q = quantize(fp32, bits=bits, method=method)
    assert ops(q)["MatMulNBits"] == 2 and ops(q)["MatMul"] == 2
    assert {a.i for n in q.graph.node for a in n.attribute if a.name == "bits"} == {bits}
    site = "layers.0.proj"
    assert {i.name for i in q.graph.input} == {"x", site + A, site + B}
    x = rng(1).standard_normal((2, 5, D_IN)).astype(np.float32)
    want = session(fp32).run(None, {"x": x})[1]
    assert rel(session(q).run(None, {"x": x})[1], want) < rtol


def test_external_data_in_and_out(tmp_path: Path) -> None:
    src, dst = tmp_path / "fp32.onnx", tmp_path / "int4" / "model.onnx"
    onnx.save(lora_graph(), str(src), save_as_external_data=True, location="fp32.onnx.data",
              size_threshold=0)
    unloaded = onnx.load(str(src), load_external_data=False)
    with pytest.raises(LoraFxError, match="external data not loaded"):
        quantize(unloaded)
    dst.parent.mkdir()
    assert quantize_file(src, dst, bits=4) == dst
    x = rng(1).standard_normal((1, 2, D_IN)).astype(np.float32)
    got = session(dst).run(None, {"x": x})[1]
    assert rel(got, session(src).run(None, {"x": x})[1]) < INT4_RTOL


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 3}, "int3"), ({"block": 48}, "--quant-block 48"),
    ({"method": "gptq"}, "unknown"), ({"accuracy_level": 7}, "0-4"),
    ({"method": "hqq", "bits": 8}, "4 bits only"),
    ({"embeddings": "all", "bits": 8}, "int4"), ({"embeddings": "some"}, "tied")])
def test_refusals(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(LoraFxError, match=match):
        quantize(lora_graph(), **kwargs)


def test_dynamo_program_gemms_through_onnx_ir(tmp_path: Path) -> None:
    """``torch.onnx.export(dynamo=True)``'s ir model, quantized in place of its own and saved by
    lorafx's saver: linears on 2-D inputs export as Gemm(x, W, b, transB=1), rewritten to
    Add(MatMul(x, Wᵀ), b) so that they quantize too."""
    from lora_fx.onnx.save import save_program

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(),
                                torch.nn.Linear(96, 32)).eval()
    x = torch.randn(3, 64)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    assert program is not None
    assert Counter(n.op_type for n in program.model.graph)["Gemm"] == 2
    program.model = quantize(program.model, accuracy_level=4)
    histogram = Counter(n.op_type for n in program.model.graph)
    assert histogram["MatMulNBits"] == 2 and histogram["Gemm"] == 0 and histogram["Add"] == 2
    save_program(program, tmp_path / "mlp.onnx")
    s = session(tmp_path / "mlp.onnx")
    got = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert rel(got, model(x).numpy()) < INT4_RTOL


# --- lorafx's own exports --------------------------------------------------------------------
def test_unmerged_export_int4(tmp_path: Path) -> None:
    """lorafx's unmerged export of a tiny LLaMA: 14 projections + head quantized, the branch
    MatMuls still read the adapter inputs, whose names, shapes and values are unchanged."""
    import lora_fx
    from lora_fx.api import export_onnx
    from tests.helpers import randomize_lora, tiny_llama, token_ids

    base, ids = tiny_llama(), token_ids(2, 8)
    gm = lora_fx.inject(base, (ids,), lora_fx.LoraConfig(r=4, lora_alpha=8,
                                                         target_modules=["q_proj", "v_proj"]))
    randomize_lora(gm, scale=0.3)
    path = tmp_path / "unmerged.onnx"
    export_onnx(gm, (ids,), path, merge=False, verify=False)
    fp32 = onnx.load(str(path))
    q = quantize(fp32, bits=4, accuracy_level=4)
    assert ops(q)["MatMulNBits"] == 2 * 7 + 1
    lora = {i.name for i in fp32.graph.input if i.name.endswith((A, B))}
    assert len(lora) == 8 and {i.name for i in q.graph.input} >= lora
    branch = [n for n in q.graph.node if n.op_type == "MatMul" and n.input[1] in lora]
    assert len(branch) == 8
    before, after = inits(fp32), inits(q)
    assert all(np.array_equal(before[n], after[n]) for n in lora)
    s, x = session(q), ids.numpy()
    got = s.run(None, {"input_ids": x})[0]
    assert rel(got, session(fp32).run(None, {"input_ids": x})[0]) < INT4_RTOL
    zeros = {n: np.zeros_like(before[n]) for n in lora}
    assert not np.allclose(s.run(None, {"input_ids": x, **zeros})[0], got)  # inputs are live
    # another adapter, converted against the int4 file, swaps in through ONNX Runtime's API
    from lora_fx.ort.adapters import convert_adapter, read_ort_adapter

    q_path = tmp_path / "int4.onnx"
    quantize_file(path, q_path, accuracy_level=4)
    randomize_lora(gm, seed=1, scale=0.3)
    lora_fx.save_adapter(gm, tmp_path / "second")
    file = convert_adapter(tmp_path / "second", tmp_path / "second.onnx_adapter",
                           model=q_path).path
    adapter = ort.LoraAdapter()
    adapter.Load(str(file))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    s = session(q_path)
    with_file = s.run(None, {"input_ids": x}, options)[0]
    fed = s.run(None, {"input_ids": x, **read_ort_adapter(file)})[0]
    np.testing.assert_array_equal(with_file, fed)
    assert not np.allclose(with_file, got)


def test_mixed_export_int4(tmp_path: Path) -> None:
    """A mixed-batch file: the stacks stay float inputs and the Gathers by adapter_ids stay
    Gathers even with embeddings='all'."""
    from lora_fx.api import export_mixed
    from tests.helpers import peft_pair, tiny_llama, token_ids

    base, ids = tiny_llama(), token_ids(2, 8)
    peft_pair(base, "llama", tmp_path / "peft")
    path = tmp_path / "mixed.onnx"
    export_mixed(base, (ids,), {"a1": tmp_path / "peft" / "a1", "a2": tmp_path / "peft" / "a2"},
                 path, verify=False)
    fp32 = onnx.load(str(path))
    q = quantize(fp32, embeddings="all")
    stacks = {i.name for i in fp32.graph.input if i.name.endswith((A, B))}
    assert stacks and {i.name for i in q.graph.input} >= stacks
    assert all(np.array_equal(inits(fp32)[n], inits(q)[n]) for n in stacks)
    gathered = [n for n in q.graph.node if n.op_type == "Gather" and n.input[0] in stacks]
    assert len(gathered) == len(stacks)
    assert ops(q)["GatherBlockQuantized"] == 1 and ops(q)["MatMulNBits"] == 15
    feeds = {"input_ids": ids.numpy(), "adapter_ids": np.array([1, 2])}
    got = session(q).run(None, feeds)[0]
    assert rel(got, session(fp32).run(None, feeds)[0]) < INT4_RTOL


def test_kv_decoder_int4_loads_and_decodes_in_genai(tmp_path: Path) -> None:
    """A tied LLaMA exported with its KV cache, quantized in place: ORT GenAI loads the folder
    and decodes; its prefill logits are near the fp32 file's; the embedding reads the head's
    int4 blocks."""
    og = pytest.importorskip("onnxruntime_genai")
    transformers = pytest.importorskip("transformers")
    from lora_fx.api import export_kv

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, tie_word_embeddings=True,
                                      max_position_embeddings=64, initializer_range=0.1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    fp32_dir, q_dir = tmp_path / "fp32", tmp_path / "int4"
    export_kv(model, fp32_dir / "model.onnx", verify=False)
    q_dir.mkdir()
    (q_dir / "genai_config.json").write_text((fp32_dir / "genai_config.json").read_text())
    quantize_file(fp32_dir / "model.onnx", q_dir / "model.onnx", accuracy_level=4)
    q = onnx.load(str(q_dir / "model.onnx"))
    assert ops(q)["MatMulNBits"] == 2 * 7 + 1 and ops(q)["GatherBlockQuantized"] == 1
    prompt = np.array([[1, 17, 42, 99, 5]], dtype=np.int64)
    feeds = kv_feeds(json.loads((q_dir / "genai_config.json").read_text()), prompt)
    want = session(fp32_dir / "model.onnx").run(["logits"], feeds)[0]
    got = session(q_dir / "model.onnx").run(["logits"], feeds)[0]
    assert rel(got, want) < INT4_RTOL
    tokens = decode(og, q_dir, prompt[0].tolist(), 8)
    assert len(tokens) == prompt.shape[1] + 8 and all(0 <= t < 256 for t in tokens)


def kv_feeds(config: dict[str, Any], ids: np.ndarray) -> dict[str, Any]:
    """A prefill's inputs for the KV-cache file: past 0."""
    d = config["model"]["decoder"]
    batch, seq = ids.shape
    feeds: dict[str, Any] = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                             "position_ids": np.arange(seq, dtype=np.int64)[None].repeat(batch,
                                                                                         0)}
    empty = np.zeros((batch, d["num_key_value_heads"], 0, d["head_size"]), np.float32)
    for i in range(d["num_hidden_layers"]):
        feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = empty
    return feeds


def decode(og: Any, folder: Path, prompt: list[int], new: int) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens([prompt])
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)]
