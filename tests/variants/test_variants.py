"""LoRA variants against PEFT's own forward: adapters PEFT writes for DoRA, rsLoRA with
rank/alpha patterns, PiSSA and OLoRA load in lorafx, merge and export to ONNX equal to PEFT
(1e-4 through ONNX Runtime) with the base model's op histogram; lorafx's own inits, DoRA
training and LoRA+ match PEFT's semantics."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lora_fx
from lora_fx.api import export_onnx
from lora_fx.errors import LoraFxError
from lora_fx.graph.state import NODE_KEY
from lora_fx.model.pissa import load_on_residual, save_plain_lora
from lora_fx.onnx.verify import flat_outputs
from tests.helpers import randomize_lora, tiny_gpt2, tiny_llama, token_ids

TARGETS = ["q_proj", "v_proj", "down_proj"]
VARIANTS: dict[str, dict[str, Any]] = {
    "rslora_patterns": dict(use_rslora=True, init_lora_weights=False,
                            target_modules=["q_proj", "v_proj", "o_proj"],
                            rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                            alpha_pattern={"o_proj": 3.0}),
    "pissa": dict(init_lora_weights="pissa"),
    "olora": dict(init_lora_weights="olora"),
    "dora": dict(use_dora=True),
}


def first(out: Any) -> torch.Tensor:
    return flat_outputs(out)[0]


def peft_config(**overrides: Any) -> dict[str, Any]:
    return {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **overrides}


def peft_trained(base: nn.Module, seed: int = 1, **cfg: Any) -> nn.Module:
    """PEFT's model with every adapter tensor moved off its init (a stand-in for training)."""
    import peft

    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    perturb(pm, seed)
    return pm.eval()


def perturb(pm: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1 * (p.abs().mean() + 0.1))


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tiny_llama()
    ids = token_ids()
    out = tmp_path_factory.mktemp("variants")
    report = export_onnx(lora_fx.capture(base, (ids,)), (ids,), out / "base.onnx")
    return {"base": base, "ids": ids, "dir": out, "hist": report.op_histogram}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_peft_adapter_merges_and_exports_like_peft(variant: str, llama: dict[str, Any]) -> None:
    """PEFT's save_pretrained (PiSSA/OLoRA: its raw save, onto the original base model)."""
    import onnxruntime as ort

    base, ids = llama["base"], llama["ids"]
    pm = peft_trained(base, **peft_config(**VARIANTS[variant]))
    directory = llama["dir"] / variant
    pm.save_pretrained(str(directory))
    gm = lora_fx.load_adapter(base, (ids,), directory).eval()
    other = token_ids(3, 6, seed=4)  # another batch and length: the export is dynamic
    with torch.no_grad():
        want = first(pm(other))
        assert (want - first(base(other))).abs().max() > 1e-2  # the adapter matters
        torch.testing.assert_close(first(gm(other)), want, rtol=1e-5, atol=1e-5)
        merged = lora_fx.merge(gm)
        assert not [n for n in merged.graph.nodes if NODE_KEY in n.meta]
        torch.testing.assert_close(first(merged(other)), want, rtol=1e-5, atol=1e-5)
    report = export_onnx(gm, (ids,), llama["dir"] / f"{variant}.onnx", merge=True)
    assert report.op_histogram == llama["hist"]
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: other.numpy()})[0]
    assert abs(got - want.numpy()).max() < 1e-4


# --- PiSSA / OLoRA -------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_conversion_and_residual_base_load_in_lorafx(init: str, tmp_path: Path) -> None:
    """PEFT's conversion to plain LoRA (rank 2r) on the original base, and the raw adapter on
    the residual base (PEFT's unload()), both give PEFT's forward."""
    import peft

    base = tiny_llama()
    ids = token_ids()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**peft_config(
        init_lora_weights=init)))
    pm.peft_config["default"].init_lora_weights = True  # PEFT's documented conversion recipe
    pm.save_pretrained(str(tmp_path / "initial"))
    pm.peft_config["default"].init_lora_weights = init
    perturb(pm, 2)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "raw"))
    pm.save_pretrained(str(tmp_path / "plain"),
                       path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["r"] == 8
    residual = copy.deepcopy(pm).unload().eval()
    with torch.no_grad():
        want = first(pm(ids))
        plain = lora_fx.merge(lora_fx.load_adapter(base, (ids,), tmp_path / "plain"))
        torch.testing.assert_close(first(plain(ids)), want, rtol=1e-5, atol=1e-5)
        on_res = load_on_residual(residual, (ids,), tmp_path / "raw").eval()
        torch.testing.assert_close(first(lora_fx.merge(on_res)(ids)), want, rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_lorafx_weight_init_matches_peft_and_saves_what_peft_merges(init: str,
                                                                    tmp_path: Path) -> None:
    import peft

    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ids = token_ids()
    cfg = peft_config(init_lora_weights=init)
    gm = lora_fx.inject(base, (ids,), lora_fx.LoraConfig(**cfg)).eval()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg)).eval()
    residual = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                for k, v in ref.named_parameters() if "base_layer.weight" in k}
    assert len(residual) == len(lora_fx.branches(gm)) == 6
    for path, want in residual.items():  # W_res = W − s·B₀A₀, as PEFT's
        torch.testing.assert_close(gm.get_parameter(path), want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(first(gm(ids)), first(base(ids)), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # untouched
    randomize_lora(gm, seed=3, scale=0.05)
    lora_fx.save_adapter(gm, tmp_path / "raw")
    save_plain_lora(gm, tmp_path / "plain")
    with torch.no_grad():
        want = first(gm(ids))
        for kind in ("raw", "plain"):  # PEFT merges both onto the original base model
            pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / kind))
            torch.testing.assert_close(first(pm.eval()(ids)), want, rtol=1e-5, atol=1e-5)
        back = lora_fx.load_adapter(base, (ids,), tmp_path / "plain")
        torch.testing.assert_close(first(lora_fx.merge(back)(ids)), want, rtol=1e-5,
                                   atol=1e-5)


def test_pissa_on_conv1d_fan_in_fan_out_equals_peft(tmp_path: Path) -> None:
    base = tiny_gpt2()
    ids = token_ids()
    pm = peft_trained(base, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                      init_lora_weights="pissa", fan_in_fan_out=True)
    pm.save_pretrained(str(tmp_path / "ad"))
    gm = lora_fx.load_adapter(base, (ids,), tmp_path / "ad").eval()
    with torch.no_grad():
        torch.testing.assert_close(first(lora_fx.merge(gm)(ids)), first(pm(ids)), rtol=1e-5,
                                   atol=1e-5)


def test_weight_inits_refuse_with_reasons() -> None:
    base = tiny_llama()
    with pytest.raises(LoraFxError, match=r"needs r <= min\(out, in\) = 16"):
        lora_fx.inject(base, (token_ids(),), lora_fx.LoraConfig(
            r=20, target_modules=["v_proj"], init_lora_weights="pissa"))
    with pytest.raises(LoraFxError, match="pissa_niter_K is randomized"):
        lora_fx.LoraConfig(target_modules=["v_proj"], init_lora_weights="pissa_niter_4")


# --- DoRA ----------------------------------------------------------------------------------

class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 12)
        self.b = nn.Linear(12, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("family", ["mlp", "gpt2"])
def test_dora_identity_at_init_and_peft_loads_lorafx_adapter(family: str,
                                                             tmp_path: Path) -> None:
    """nn.Linear with and without bias (symbolic_trace), HF Conv1D (addmm, fan_in_fan_out)."""
    import peft

    torch.manual_seed(0)
    base, x, targets = ((TwoLayer().eval(), torch.randn(3, 16), ["a", "b"]) if family == "mlp"
                        else (tiny_gpt2(), token_ids(), ["c_attn", "c_proj"]))
    gm = lora_fx.inject(base, (x,), lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                       use_dora=True)).eval()
    with torch.no_grad():
        torch.testing.assert_close(first(gm(x)), first(base(x)), rtol=1e-6, atol=1e-6)
    randomize_lora(gm, seed=5)
    with torch.no_grad():
        for p in gm.parameters():
            if p.ndim == 1 and p.requires_grad:  # the magnitudes
                p.mul_(1 + 0.2 * torch.rand(p.shape))
    lora_fx.save_adapter(gm, tmp_path / "ad")
    keys = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert sum(k.endswith(".lora_magnitude_vector") for k in keys) == len(lora_fx.branches(gm))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad"),
                                        is_trainable=True).eval()
    with torch.no_grad():
        want = first(pm(x))
        torch.testing.assert_close(first(gm(x)), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(first(lora_fx.merge(gm)(x)), want, rtol=1e-5, atol=1e-5)
    assert lora_fx.count_parameters(gm) == tuple(pm.get_nb_trainable_parameters())


def test_dora_gradients_equal_peft() -> None:
    """Training semantics: ‖W + s·B A‖ is detached, m, A and B get PEFT's gradients."""
    base = tiny_llama()
    ids = token_ids()
    pm = peft_trained(base, seed=6, **peft_config(use_dora=True))
    pm.train()
    gm = lora_fx.load_adapter(base, (ids,), _saved(pm)).train()
    first(pm(ids)).square().mean().backward()
    first(gm(ids)).square().mean().backward()
    ours = dict(gm.named_parameters())
    checked = 0
    for name, p in pm.named_parameters():
        if p.grad is None:
            continue
        site = name.replace("base_model.model.", "").split(".lora_")[0]
        part = name.split(".lora_")[1].split(".")[0]
        mine = ours[f"lora.{site}.lora_{part}" + ("" if part == "magnitude_vector" else
                                                   ".weight")]
        assert mine.grad is not None
        torch.testing.assert_close(mine.grad, p.grad, rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked == 3 * 6  # A, B and m at six sites


def _saved(pm: nn.Module) -> Path:
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="lorafx-dora-"))
    pm.save_pretrained(str(directory))
    return directory


def test_dora_refuses_non_linear_sites() -> None:
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    with pytest.raises(LoraFxError, match="supports DoRA on linear ops"):
        lora_fx.inject(conv, (torch.randn(1, 3, 8, 8),), lora_fx.LoraConfig(
            target_modules=["0"], target_forms=["conv"], use_dora=True))


# --- LoRA+ ---------------------------------------------------------------------------------

def test_loraplus_step_equals_peft() -> None:
    """One AdamW step with PEFT's create_loraplus_optimizer and lorafx's: identical A, B, m,
    head weight and bias (lr ratio 16, weight decay on B and m but not on the bias)."""
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus
    from transformers import BertConfig, BertForSequenceClassification

    from lora_fx.variants.loraplus import create_loraplus_optimizer

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(
        num_hidden_layers=1, hidden_size=32, num_attention_heads=4, intermediate_size=64,
        vocab_size=97, max_position_embeddings=32, num_labels=3)).eval()
    ids = token_ids()
    cfg = dict(r=4, lora_alpha=8, target_modules=["query", "value"], use_dora=True,
               modules_to_save=["classifier"])
    pm = peft_trained(base, seed=7, **cfg)
    gm = lora_fx.load_adapter(base, (ids,), _saved(pm))
    kw = dict(lr=1e-2, loraplus_lr_ratio=16.0, loraplus_weight_decay=0.1)
    opts = [peft_loraplus(pm, torch.optim.AdamW, **kw),  # type: ignore[arg-type]
            create_loraplus_optimizer(gm, torch.optim.AdamW, **kw)]  # type: ignore[arg-type]
    labels = torch.tensor([0, 2])
    for model, opt in zip((pm, gm), opts, strict=True):
        model.eval()  # no dropout: both see the same function
        loss = nn.functional.cross_entropy(first(model(ids)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = lora_fx.api.to_adapter(gm)
    peft_state = {k.replace(".default", ""): v for k, v in pm.state_dict().items()}
    for site, (a, b) in after.lora.items():
        key = f"base_model.model.{site}"
        torch.testing.assert_close(a, peft_state[f"{key}.lora_A.weight"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, peft_state[f"{key}.lora_B.weight"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(after.magnitude[site],
                                   peft_state[f"{key}.lora_magnitude_vector.weight"],
                                   rtol=1e-5, atol=1e-6)
    for pname in ("weight", "bias"):
        torch.testing.assert_close(
            after.saved[f"classifier.{pname}"],
            peft_state[f"base_model.model.classifier.modules_to_save.{pname}"],
            rtol=1e-5, atol=1e-6)
    lrs = sorted(g["lr"] for g in opts[1].param_groups)
    assert lrs == [1e-2, 0.16, 0.16]
