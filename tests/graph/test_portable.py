"""Captured graphs follow ``.to()`` like the eager model they came from (graph.portable).

torch.export bakes ``device=cpu`` into arange/zeros/_assert_tensor_metadata/aten.to.device and
fp32 into casts and metadata asserts. An injected or merged HF LLaMA / GPT-2 moved to the meta
device (the stand-in for "not the CPU" on a machine without a GPU) must keep no argument,
fake value or tensor naming the CPU and still run; cast to bf16 it must run and agree with
PEFT's model cast the same way (tolerance relative to max |output|: bf16 rounding).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import fx, nn

import lora_fx
from lora_fx.errors import LoraFxError
from lora_fx.graph.portable import PortableGraphModule, constants
from tests.helpers import peft_model_like, randomize_lora, tiny_gpt2, tiny_llama

MODELS = {"llama": (tiny_llama, ["q_proj", "v_proj"]), "gpt2": (tiny_gpt2, ["c_attn"])}


def _ids(batch: int = 2, seq: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def _built(name: str) -> tuple[nn.Module, fx.GraphModule, nn.Module]:
    """(PEFT's model with the same random A, B, injected, merged), PEFT's built first."""
    build, targets = MODELS[name]
    base = build()
    gm = lora_fx.inject(base, (_ids(),), lora_fx.LoraConfig(r=4, lora_alpha=8,
                                                             target_modules=targets))
    randomize_lora(gm, seed=3)
    pm = peft_model_like(base, gm, r=4, lora_alpha=8, target_modules=targets)
    return pm, gm, lora_fx.merge(gm)


def _cpu_mentions(gm: fx.GraphModule) -> list[str]:
    """Every device argument, fake value and tensor of ``gm`` that names the CPU."""
    found: list[str] = []

    def visit(a: Any, where: str) -> Any:
        if isinstance(a, torch.device) and a.type == "cpu":
            found.append(f"arg of {where}")
        if isinstance(a, torch.Tensor) and a.device.type == "cpu":
            found.append(f"value of {where}")
        return a

    for node in gm.graph.nodes:
        fx.node.map_aggregate((node.args, node.kwargs),
                              lambda a, n=node: visit(a, n.name))  # type: ignore[misc]
        fx.node.map_aggregate(node.meta.get("val"),
                              lambda a, n=node: visit(a, n.name))  # type: ignore[misc]
    named = [*gm.named_parameters(remove_duplicate=False),
             *gm.named_buffers(remove_duplicate=False), *constants(gm).items()]
    found += [f"tensor {n}" for n, t in named if t.device.type == "cpu"]
    return found


@pytest.fixture(scope="module", params=sorted(MODELS))
def built(request: pytest.FixtureRequest) -> tuple[str, nn.Module, fx.GraphModule, nn.Module]:
    return (request.param, *_built(request.param))


@pytest.mark.parametrize("which", ["injected", "merged"])
def test_moved_to_meta_names_no_cpu(built: Any, which: str) -> None:
    name, _, gm, merged = built
    module = copy.deepcopy(gm if which == "injected" else merged)
    assert isinstance(module, PortableGraphModule)
    baked = sum(isinstance(a, torch.device) for n in module.graph.nodes
                for a in [*n.args, *n.kwargs.values()])
    assert baked, "the capture baked no device: nothing is tested"
    module.to("meta")
    assert _cpu_mentions(module) == []
    out = _logits(module(_ids().to("meta")))
    assert out.device.type == "meta" and out.shape == (2, 8, 97)
    if which == "merged":  # the kept program followed too: export still reuses it
        from lora_fx.capture.program import captured_program

        program = captured_program(module)
        assert program is not None
        assert not any(isinstance(a, torch.device) and a.type == "cpu"
                       for n in program.graph.nodes for a in [*n.args, *n.kwargs.values()])


@pytest.mark.parametrize("which", ["injected", "merged"])
def test_bf16_cast_agrees_with_peft_cast_the_same_way(built: Any, which: str) -> None:
    name, pm, gm, merged = built
    pm, module = copy.deepcopy(pm), copy.deepcopy(gm if which == "injected" else merged)
    pm.to(torch.bfloat16)
    assert module.to(torch.bfloat16) is module
    ids = _ids(3, 11, seed=1)  # another shape: the dynamic axes survive the capture again
    with torch.no_grad():
        want = _logits(pm(ids)).float()
        got = _logits(module(ids))
    assert got.dtype == torch.bfloat16
    err = float((got.float() - want).abs().max() / want.abs().max())
    print(f"{name} {which} bf16 vs PEFT bf16: {err:.3g} of max |y|")
    assert err <= (1e-3 if which == "injected" else 2e-2)  # merged: W' rounded once to bf16


def test_half_then_float_round_trip_runs() -> None:
    """``.half()`` then ``.float()``: each cast captures again; fp32 after the round trip
    equals PEFT's model taken through the same casts."""
    pm, gm, _ = _built("llama")
    for step in ("half", "float"):
        getattr(gm, step)()
        getattr(pm, step)()
    with torch.no_grad():
        torch.testing.assert_close(_logits(gm(_ids())), _logits(pm(_ids())), atol=1e-5,
                                   rtol=1e-5)


def test_capture_on_meta_then_materialize_on_cpu() -> None:
    """Capture where the weights are not (meta), ``to_empty`` on the CPU, load the weights:
    the baked meta devices follow and the model computes PEFT's output."""
    real = tiny_llama()
    with torch.device("meta"):
        skeleton = tiny_llama()
    gm = lora_fx.inject(skeleton, (_ids().to("meta"),), lora_fx.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    gm.to_empty(device="cpu")
    missing = gm.load_state_dict(real.state_dict(), strict=False).missing_keys
    buffers = dict(real.named_buffers())  # non-persistent (rotary inv_freq): not in state_dict
    assert missing and all(".lora_" in k or k in buffers for k in missing)
    with torch.no_grad():
        for name, buf in buffers.items():
            gm.get_buffer(name).copy_(buf)
    randomize_lora(gm, seed=4)
    assert not any("meta" in str(a) for n in gm.graph.nodes for a in n.kwargs.values())
    pm = peft_model_like(real, gm, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        torch.testing.assert_close(_logits(gm(_ids())), _logits(pm(_ids())), atol=1e-5,
                                   rtol=1e-5)


def test_training_graph_cast_stays_fused() -> None:
    """A ``training_graph`` copy cast to bf16 is captured again and fused again."""
    from lora_fx.passes.fuse_branches import lora_addmm

    pm, gm, _ = _built("gpt2")
    train = lora_fx.training_graph(gm).to(torch.bfloat16)
    assert any(n.target is lora_addmm for n in train.graph.nodes)
    pm.to(torch.bfloat16)
    with torch.no_grad():
        want = _logits(pm(_ids())).float()
        err = float((_logits(train(_ids())).float() - want).abs().max() / want.abs().max())
    assert err <= 1e-2


def test_cast_keeps_trained_factors_and_saved_modules(tmp_path: Path) -> None:
    """A cast re-attaches the same branches (A, B, DoRA's m: nothing re-initialized) and
    modules_to_save copies; PEFT cast the same way agrees."""
    import peft

    base = tiny_llama()
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True,
               modules_to_save=["lm_head"])
    gm = lora_fx.inject(base, (_ids(),), lora_fx.LoraConfig(**cfg))  # type: ignore[arg-type]
    randomize_lora(gm, seed=5)
    with torch.no_grad():
        for p in lora_fx.lora_parameters(gm):
            p.add_(0.01 * torch.randn_like(p))  # m and the head copy trained away from init
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))  # type: ignore
    lora_fx.save_adapter(gm, tmp_path / "a")
    pm.load_adapter(tmp_path / "a", adapter_name="default")
    before = {n: p.detach().clone() for n, p in gm.named_parameters() if p.requires_grad}
    gm.to(torch.bfloat16)
    pm.to(torch.bfloat16)
    after = {n: p.detach().float() for n, p in gm.named_parameters() if p.requires_grad}
    assert after.keys() == before.keys()
    for n, p in before.items():
        torch.testing.assert_close(after[n], p.to(torch.bfloat16).float(), atol=0, rtol=0)
    with torch.no_grad():
        want = _logits(pm.eval()(_ids())).float()
        err = float((_logits(gm(_ids())).float() - want).abs().max() / want.abs().max())
    assert err <= 2e-2


def test_untied_merge_refuses_a_cast_with_the_reason() -> None:
    """A merge that untied a shared weight (GPT-2's wte, tied to lm_head) cannot be captured
    again from the model's code: the refusal says why and what to do."""
    base = tiny_gpt2()
    gm = lora_fx.inject(base, (_ids(),), lora_fx.LoraConfig(r=4, target_modules=["wte"]))
    randomize_lora(gm)
    merged = lora_fx.merge(gm)
    with pytest.raises(LoraFxError, match="no longer read.*cast the model before"):
        merged.to(torch.bfloat16)
