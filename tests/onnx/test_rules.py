"""lora_fx.onnx.rules.op_type_first: onnxscript's rewrites, unchanged, with fewer match
set-ups; every rule's own matcher back afterwards."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper
from onnxscript.rewriter import pattern

import lora_fx
from lora_fx.onnx import rules as onnxscript_rules
from lora_fx.onnx.rules import op_type_first
from tests.helpers import randomize_lora, tiny_gpt2, token_ids


def _model() -> onnx.ModelProto:
    """Per i: Relu(x_i), Neg(x_i) for the two-output rule, Relu(Relu(Neg(x_i))) for the
    one-output rule, and Exp, Add that neither matches."""
    nodes, outputs = [], []
    for i in range(4):
        nodes += [helper.make_node("Exp", ["x"], [f"x{i}"]),
                  helper.make_node("Relu", [f"x{i}"], [f"r{i}"]),
                  helper.make_node("Neg", [f"x{i}"], [f"n{i}"]),
                  helper.make_node("Relu", [f"n{i}"], [f"q{i}"]),
                  helper.make_node("Relu", [f"q{i}"], [f"qq{i}"]),
                  helper.make_node("Add", [f"r{i}", f"qq{i}"], [f"y{i}"])]
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [2, 3]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [2, 3])], outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _rules(matcher: Any) -> pattern.RewriteRuleSet:
    """Relu(x), Neg(x) → Abs(x), Neg(x) (two output nodes); Relu(Relu(x)) → Relu(x) (one)."""
    def two(op: Any, x: Any) -> Any:
        return op.Relu(x), op.Neg(x)

    def two_new(op: Any, x: Any) -> Any:
        return op.Abs(x), op.Neg(x)

    def twice(op: Any, x: Any) -> Any:
        return op.Relu(op.Relu(x))

    def once(op: Any, x: Any) -> Any:
        return op.Relu(x)

    return pattern.RewriteRuleSet([pattern.RewriteRule(two, two_new, matcher=matcher),
                                   pattern.RewriteRule(twice, once, matcher=matcher)])


def test_op_type_first_matcher_rewrites_as_onnxscripts_own(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """Same rewrites, same resulting graph, fewer match set-ups (the cost it removes)."""
    fast = onnxscript_rules._op_type_first_class()
    assert fast is not None
    setups = {"n": 0}
    init = pattern.SimplePatternMatcher._init_match

    def counted(self: Any, verbose: int) -> None:
        setups["n"] += 1
        init(self, verbose)

    monkeypatch.setattr(pattern.SimplePatternMatcher, "_init_match", counted)
    results = {}
    for name, cls in (("onnxscript", pattern.SimplePatternMatcher), ("fast", fast)):
        model = ir.serde.deserialize_model(_model())
        setups["n"] = 0
        count = _rules(cls).apply_to_model(model)
        results[name] = (count, setups["n"], ir.serde.serialize_model(model).SerializeToString(),
                         [n.op_type for n in model.graph])
    assert results["fast"][0] == results["onnxscript"][0] == 8  # both rules, four times each
    assert results["fast"][2] == results["onnxscript"][2]
    assert results["fast"][3].count("Abs") == 4 and results["fast"][3].count("Relu") == 4
    assert results["fast"][1] < results["onnxscript"][1] / 2


def test_op_type_first_exports_the_same_file() -> None:
    """A real export (tiny GPT-2 with random non-zero B, dynamic axes) through onnxscript's
    optimizer is byte for byte the same file with and without the swap."""
    gm = lora_fx.inject(tiny_gpt2(), (token_ids(),), lora_fx.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"])).eval()
    randomize_lora(gm)
    dims = ({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},)
    files = []
    for fast in (False, True):
        with op_type_first() if fast else nullcontext(0) as swapped:
            assert swapped > 20 if fast else swapped == 0  # onnxscript's rules were found
            program = torch.onnx.export(gm, (token_ids(),), dynamo=True, optimize=True,
                                        verbose=False, dynamic_shapes=dims)
        files.append(program.model_proto.SerializeToString())
    assert files[0] == files[1]


def test_op_type_first_puts_every_matcher_back() -> None:
    """On exit and on error each rule has its own matcher object again; nested use swaps
    nothing more."""
    with op_type_first():
        pass  # onnxscript's rule modules are loaded now
    before = {id(r): r._matcher for r in onnxscript_rules._rules()}
    with pytest.raises(RuntimeError), op_type_first() as outer:
        assert outer > 20
        with op_type_first() as inner:
            assert inner == 0
        assert any(r._matcher is not before[id(r)] for r in onnxscript_rules._rules())
        raise RuntimeError("boom")
    assert all(r._matcher is before[id(r)] for r in onnxscript_rules._rules())


def test_export_onnx_optimizes_with_op_type_first(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Any) -> None:
    """lorafx's exports (the captured program's and a traced one's) run onnxscript's optimizer
    with the swapped matchers."""
    import onnxscript.optimizer

    fast = onnxscript_rules._op_type_first_class()
    seen: list[bool] = []
    optimize = onnxscript.optimizer.optimize_ir

    def spy(model: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(all(type(r._matcher) is not pattern.SimplePatternMatcher
                        for r in onnxscript_rules._rules()))
        return optimize(model, *args, **kwargs)

    monkeypatch.setattr(onnxscript.optimizer, "optimize_ir", spy)
    gm = lora_fx.inject(tiny_gpt2(), (token_ids(),), lora_fx.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"])).eval()
    randomize_lora(gm)
    lora_fx.export_onnx(gm, (token_ids(),), tmp_path / "m.onnx", verify=False)
    lora_fx.export_onnx(gm, (token_ids(),), tmp_path / "u.onnx", merge=False, verify=False)
    assert seen == [True, True] and fast is not None
