"""LoRA on mixture-of-experts models (issue 26): capture, expert sites, PEFT's
target_parameters both ways, merge, ONNX. Tiny Mixtral / Qwen3-MoE / OLMoE from configs
(tests/models/tiny_moe.py): hidden 32, 2 layers, 4 experts, top 2."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import lora_fx
from lora_fx.match.matcher import find_sites
from tests.helpers import (
    ROOT,
    load_model_file,
    logits_of,
    ort_outputs,
    randomize_lora,
    run_cli,
)

MOE = load_model_file(ROOT / "tests" / "models" / "tiny_moe.py")


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(seed))


# --- capture -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(MOE.FAMILIES))
@pytest.mark.parametrize(("impl", "form"), [("default", "grouped_mm"), ("eager", "grouped_mm"),
                                            ("batched_mm", "bmm")])
def test_capture_moe_gives_eager_logits_and_restores_config(family: str, impl: str,
                                                            form: str) -> None:
    """The data-dependent eager loop is captured as grouped_mm; grouped_mm (transformers'
    default) and batched_mm as they are; expert sites of that form either way."""
    model = MOE.FAMILIES[family]()
    if impl != "default":
        model.set_experts_implementation(impl)
    before = model.config._experts_implementation
    x = ids()
    gm = lora_fx.capture(model, (x,))
    assert model.config._experts_implementation == before  # the user's choice is given back
    assert {s.form for s in find_sites(gm)[0] if s.kind == "experts"} == {form}
    with torch.no_grad():
        torch.testing.assert_close(logits_of(gm(x)), model(x).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["default", "batched_mm"])
def test_base_mixtral_exports_to_onnx_and_verifies(impl: str, tmp_path: Path) -> None:
    """grouped_mm through lorafx's translation (onnx.experts), batched_mm as torch's."""
    model = MOE.mixtral()
    if impl != "default":
        model.set_experts_implementation(impl)
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
            gate_up["out_features"], gate_up["peft"]) == (4, "grouped_mm", 32, 96, True)
    table = run_cli("inspect", ROOT / "tests" / "models" / "tiny_moe.py").stdout
    assert "experts" in table.splitlines()[1]  # the header has an experts column


# --- target_parameters: PEFT's semantics and layout, both ways -----------------------------
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("family", sorted(MOE.FAMILIES))
def test_injected_experts_equal_peft_target_parameters_both_ways(family: str,
                                                                  tmp_path: Path) -> None:
    """lorafx (attention + expert stacks, random A and B) == PEFT loading lorafx's adapter;
    the keys and shapes lorafx writes are PEFT's own; merged == unmerged."""
    import peft  # the reference implementation (tests only)
    from safetensors.torch import load_file

    model, x = MOE.FAMILIES[family](), ids()
    gm = lora_fx.inject(model, (x,), lora_fx.LoraConfig(**CONFIG))
    randomize_lora(gm, seed=1, scale=0.3)
    lora_fx.save_adapter(gm, tmp_path / "lorafx")
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "lorafx").eval()
    own = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**CONFIG))
    own.save_pretrained(tmp_path / "peft")
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors")
                    for d in ("lorafx", "peft"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    with torch.no_grad():
        want, base = ref(x).logits, model(x).logits
        got, merged = logits_of(gm(x)), logits_of(lora_fx.merge(gm)(x))
    assert (want - base).abs().max() > 0.1  # the adapter moves the logits
    assert rel(got, want) < 1e-5 and rel(merged, got) < 1e-5


def test_expert_gradients_equal_peft() -> None:
    """A training step's gradients on A and B of every site == PEFT's (same factors)."""
    model, x = MOE.mixtral(), ids()
    gm = lora_fx.inject(model, (x,), lora_fx.LoraConfig(**CONFIG))
    randomize_lora(gm, seed=2, scale=0.3)
    ref = peft_with(model, gm)
    logits_of(gm(x)).square().mean().backward()
    ref(x).logits.square().mean().backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    for name, b in lora_fx.branches(gm).items():
        for ab in "AB":
            want = grads[f"base_model.model.{b.peft_name or name}.lora_{ab}.default.weight"]
            got = getattr(b, f"lora_{ab}").weight.grad
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_peft_expert_adapter_loads_in_lorafx(family: str, tmp_path: Path) -> None:
    import peft  # the reference implementation (tests only)

    model, x = MOE.FAMILIES[family](), ids()
    torch.manual_seed(5)
    ref = peft.get_peft_model(copy.deepcopy(model),
                              peft.LoraConfig(init_lora_weights=False, **CONFIG)).eval()
    ref.save_pretrained(tmp_path)
    gm = lora_fx.load_adapter(model, (x,), tmp_path)
    with torch.no_grad():
        want = ref(x).logits
        assert (want - model(x).logits).abs().max() > 0.1
        assert rel(logits_of(gm(x)), want) < 1e-5


def test_merged_expert_lora_exports_to_onnx_with_the_base_ops(tmp_path: Path) -> None:
    model, x = MOE.mixtral(), ids()
    gm = lora_fx.inject(model, (x,), lora_fx.LoraConfig(**CONFIG))
    randomize_lora(gm, seed=3, scale=0.3)
    with torch.no_grad():
        want, base = peft_with(model, gm)(x).logits, model(x).logits
    merged = lora_fx.export_onnx(gm, (x,), tmp_path / "merged.onnx", merge=True)
    plain = lora_fx.export_onnx(lora_fx.capture(model, (x,)), (x,), tmp_path / "base.onnx")
    assert merged.op_histogram == plain.op_histogram
    got = ort_outputs(merged.path, (x,))[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # PEFT's logits
    assert (want - base).abs().max() > 100 * (got - want).abs().max()  # the adapter is there


def peft_with(model: torch.nn.Module, gm: torch.nn.Module) -> torch.nn.Module:
    """PEFT's target_parameters model of ``model`` holding lorafx's A and B (PEFT's keys)."""
    import peft  # the reference implementation (tests only)

    ref = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**CONFIG))
    state = {f"base_model.model.{b.peft_name or name}.lora_{ab}.default.weight":
             getattr(b, f"lora_{ab}").weight.detach()
             for name, b in lora_fx.branches(gm).items() for ab in "AB"}
    assert not ref.load_state_dict(state, strict=False).unexpected_keys
    return ref


def test_cli_inject_target_parameters_writes_peft_layout(tmp_path: Path) -> None:
    run_cli("inject", ROOT / "tests" / "models" / "tiny_moe.py", "-t", "q_proj",
            "--target-parameters", "mlp.experts.gate_up_proj", "mlp.experts.down_proj", "-r", "4",
            "-o", tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(EXPERTS)
    gm = lora_fx.load_adapter(MOE.mixtral(), (ids(),), tmp_path / "a")
    experts = {n: b for n, b in lora_fx.branches(gm).items() if b.kind == "experts"}
    assert tuple(experts["model.layers.0.mlp.experts.gate_up_proj"].lora_A.weight.shape) == \
        (4 * 4, 32)  # PEFT's [r * E, in]
    assert tuple(experts["model.layers.0.mlp.experts.gate_up_proj"].lora_B.weight.shape) == \
        (96, 4 * 4)  # PEFT's [out, r * E]


# --- bad input, one line each ------------------------------------------------------------
def test_expert_adapter_for_another_expert_count_is_refused(tmp_path: Path) -> None:
    import peft  # the reference implementation (tests only)

    six = peft.get_peft_model(MOE.mixtral(experts=6), peft.LoraConfig(
        r=4, lora_alpha=8, target_parameters=EXPERTS))
    six.save_pretrained(tmp_path)
    with pytest.raises(lora_fx.LoraFxError, match=r"model's 4 experts .* holds 6 experts") as e:
        lora_fx.load_adapter(MOE.mixtral(), (ids(),), tmp_path)
    assert "\n" not in str(e.value)


def test_expert_adapter_with_other_dims_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    gm = lora_fx.inject(MOE.mixtral(), (ids(),), lora_fx.LoraConfig(
        r=4, lora_alpha=8, target_parameters=EXPERTS))
    lora_fx.save_adapter(gm, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(path)
    key = "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"
    state[key] = state[key][:, :30].contiguous()  # gate_up_proj's A for hidden 30, not 32
    save_file(state, path)
    fit = r"do not fit the model's 4 experts of \[96, 32\]"
    with pytest.raises(lora_fx.LoraFxError, match=fit):
        lora_fx.load_adapter(MOE.mixtral(), (ids(),), tmp_path)


@pytest.mark.parametrize(("names", "message"), [
    (["input_layernorm.weight"], r"names 'model.layers.0.input_layernorm.weight' \(1-D \[32\]\), "
                                 "which no linear op"),
    (["mlp.experts.up_proj"], r"entry 'mlp.experts.up_proj' matches no parameter: closest: "),
])
def test_target_parameters_naming_no_expert_stack_is_refused(names: list[str],
                                                             message: str) -> None:
    with pytest.raises(lora_fx.LoraFxError, match=message) as e:
        lora_fx.inject(MOE.mixtral(), (ids(),), lora_fx.LoraConfig(target_parameters=names))
    assert "\n" not in str(e.value)


def test_dora_on_experts_is_refused_as_peft_does() -> None:
    with pytest.raises(lora_fx.LoraFxError, match="target_parameters does not work with "
                                                  "use_dora=True"):
        lora_fx.LoraConfig(target_parameters=EXPERTS, use_dora=True)
    with pytest.raises(lora_fx.LoraFxError, match="DoRA does not apply to expert parameters"):
        lora_fx.inject(MOE.mixtral(), (ids(),), lora_fx.LoraConfig(
            target_forms=["experts"], use_dora=True))


def test_merged_expert_kv_export_decodes_peft_greedy_tokens(tmp_path: Path) -> None:
    """export_kv with an expert adapter (merged): onnxruntime and ORT GenAI decode PEFT's
    greedy tokens, which the adapter changes."""
    model = MOE.mixtral()
    gm = lora_fx.inject(model, (ids(),), lora_fx.LoraConfig(**CONFIG))
    randomize_lora(gm, seed=1, scale=0.1)
    lora_fx.save_adapter(gm, tmp_path / "adapter")
    lora_fx.export_kv(model, tmp_path / "kv" / "model.onnx", adapter=tmp_path / "adapter",
                      merge=True, fuse=False)
    prompt = torch.tensor([[5, 9, 13, 2]])
    with torch.no_grad():
        want = peft_with(model, gm).generate(input_ids=prompt, max_new_tokens=8,
                                             do_sample=False)[0, 4:].tolist()
        base = model.generate(prompt, max_new_tokens=8, do_sample=False)[0, 4:].tolist()
    assert want != base
    for engine in ("onnxruntime", "onnxruntime_genai"):
        out = run_cli("generate", tmp_path / "kv", "--prompt-ids", "5,9,13,2",
                      "--max-new-tokens", "8", "--engine", engine, "--json").stdout
        assert json.loads(out)["tokens"] == [want], engine


def test_expert_adapters_are_refused_where_a_dense_delta_is_assumed(tmp_path: Path) -> None:
    """ONNX Runtime adapter files and the rank analysis take [out, in] sites: an expert stack
    is refused in one line, not written or analyzed as a meaningless matrix."""
    from lora_fx.adapter.analysis import analyze
    from lora_fx.adapter.peft import read_adapter
    from lora_fx.ort.adapters import onnx_params

    gm = lora_fx.inject(MOE.mixtral(), (ids(),), lora_fx.LoraConfig(**CONFIG))
    lora_fx.save_adapter(gm, tmp_path)
    adapter = read_adapter(tmp_path)
    assert adapter.experts("model.layers.0.mlp.experts.base_layer") == 4
    assert adapter.experts("model.layers.0.self_attn.q_proj") == 1
    with pytest.raises(lora_fx.LoraFxError, match="stack of 4 experts .* export the model merged"):
        onnx_params(adapter)
    with pytest.raises(lora_fx.LoraFxError, match="stack of 4 experts .* no single"):
        analyze(adapter)
