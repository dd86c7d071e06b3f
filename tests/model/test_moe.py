"""LoRA on mixture-of-experts models (issue 26): capture, expert sites, PEFT's
target_parameters both ways, merge, ONNX. Tiny Mixtral / Qwen3-MoE / OLMoE from configs
(tests/models/tiny_moe.py): hidden 32, 2 layers, 4 experts, top 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lora_fx
from tests.helpers import ROOT, load_model_file, logits_of, run_cli

MOE = load_model_file(ROOT / "tests" / "models" / "tiny_moe.py")


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(seed))


# --- capture -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(MOE.FAMILIES))
@pytest.mark.parametrize("impl", ["default", "eager"])
def test_capture_moe_gives_eager_logits_and_restores_config(family: str, impl: str) -> None:
    model = MOE.FAMILIES[family]()
    if impl != "default":
        model.set_experts_implementation(impl)
    before = model.config._experts_implementation
    x = ids()
    gm = lora_fx.capture(model, (x,))
    assert model.config._experts_implementation == before  # the user's choice is given back
    assert any("bmm" in str(n.target) for n in gm.graph.nodes)  # batched_mm was captured
    with torch.no_grad():
        torch.testing.assert_close(logits_of(gm(x)), model(x).logits, rtol=1e-5, atol=1e-6)


def test_base_mixtral_exports_to_onnx_and_verifies(tmp_path: Path) -> None:
    model = MOE.mixtral()
    report = lora_fx.export_onnx(lora_fx.capture(model, (ids(),)), (ids(),),
                                 tmp_path / "base.onnx")
    assert report.max_abs_diff < 1e-5
    assert all(op.startswith("ai.onnx::") for op in report.op_histogram)


# --- expert sites ----------------------------------------------------------------------------
def test_inspect_lists_expert_sites_with_their_expert_count() -> None:
    out = run_cli("inspect", ROOT / "tests" / "models" / "tiny_moe.py", "--json").stdout
    experts = {s["name"]: s for s in json.loads(out)["sites"] if s["kind"] == "experts"}
    assert sorted(experts) == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                               for p in ("down_proj", "gate_up_proj")]
    gate_up = experts["model.layers.0.mlp.experts.gate_up_proj"]
    assert (gate_up["experts"], gate_up["form"], gate_up["in_features"],
            gate_up["out_features"], gate_up["peft"]) == (4, "bmm", 32, 96, True)
    table = run_cli("inspect", ROOT / "tests" / "models" / "tiny_moe.py").stdout
    assert "experts" in table.splitlines()[1]  # the header has an experts column
