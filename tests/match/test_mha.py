"""nn.MultiheadAttention / nn.TransformerEncoder: in_proj_weight, out_proj and the feed-forward
linears are sites; trained, injected == merged == ONNX == a hand-written merge.

PEFT as a reference, where it is right: its MultiheadAttention LoRA (in_proj, and out_proj with
it) folds the out_proj delta twice in forward (W + 2·s·B@A, peft 0.21.2; huggingface/peft PR
#3774), and in eval mode nn.TransformerEncoderLayer's fused fast path reads linear1/linear2's
weights directly, skipping PEFT's wrappers. So PEFT parity is checked on in_proj and the
feed-forward linears with the fast path off; out_proj against the hand merge.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import lora_fx
from lora_fx.cli.main import cli
from lora_fx.match.matcher import find_sites
from lora_fx.match.peft_reach import peft_reachable
from tests.helpers import (
    check_merged_onnx,
    factors,
    hand_merged,
    lora_scale,
    randomize_lora,
)


class Encoder(nn.Module):
    """Linear → 2-layer TransformerEncoder → a standalone MultiheadAttention → head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(self.embed(x))
        a, _ = self.mha(h, h, h, need_weights=False)
        return self.head(a.mean(1))


X = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0))
ATTN = ("enc.layers.0.self_attn", "enc.layers.1.self_attn", "mha")


SITES = [f"{attn}.{w}" for attn in ATTN for w in ("in_proj_weight", "out_proj")] + [
    f"enc.layers.{i}.linear{j}" for i in (0, 1) for j in (1, 2)]


def hand_merge(base: nn.Module, gm: nn.Module) -> nn.Module:
    """W + s·B@A at every site of SITES, s = 4 / 2: in_proj_weight [3E, E], out_proj, linear1
    and linear2 (nn.Linear) all keep W as [out, in]."""
    return hand_merged(base, gm, dict.fromkeys(SITES, "out_in"), lora_scale(4, 2))


def peft_twin(base: nn.Module, gm: nn.Module) -> nn.Module:
    """PEFT's model (MultiheadAttention LoRA: in_proj and out_proj together) with our A, B."""
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["self_attn", "mha", "linear1",
                                                              "linear2"])
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    state = {}
    for name in lora_fx.branches(gm):
        a, b = factors(gm, name)
        key = name.replace(".in_proj_weight", "").replace(".out_proj", ".base_layer.out_proj")
        state[f"base_model.model.{key}.lora_A.default.weight"] = a
        state[f"base_model.model.{key}.lora_B.default.weight"] = b
    assert not pm.load_state_dict(state, strict=False).unexpected_keys
    return pm.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Random A, B, then 5 Adam steps on a regression target; hand merge of the result."""
    base = Encoder().eval()
    cfg = lora_fx.LoraConfig(r=2, lora_alpha=4, target_modules=["in_proj_weight", "out_proj",
                                                                "linear1", "linear2"])
    gm = lora_fx.inject(base, (X,), cfg)
    randomize_lora(gm, seed=3, scale=0.2)
    target = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(lora_fx.lora_parameters(gm), lr=1e-2)
    gm.train()
    losses = []
    for _ in range(5):
        loss = (gm(X) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    gm.eval()
    with torch.no_grad():
        want = hand_merge(base, gm)(X)
    onnx = check_merged_onnx(gm, lora_fx.capture(base, (X,)), (X,), want,
                             tmp_path_factory.mktemp("mha"))
    return {"base": base, "gm": gm, "losses": losses, "want": want, **onnx}


def test_attention_projections_are_sites_peft_can_reach() -> None:
    gm = lora_fx.capture(Encoder().eval(), (X,))
    sites = {s.name: s for s in find_sites(gm)[0]}
    for attn in ATTN:
        assert sites[f"{attn}.in_proj_weight"].out_features == 48  # q, k, v fused
        assert sites[f"{attn}.out_proj"].form == "F.linear"
        assert peft_reachable(sites[f"{attn}.in_proj_weight"])
        assert peft_reachable(sites[f"{attn}.out_proj"])
    assert {"enc.layers.0.linear1", "enc.layers.1.linear2", "embed", "head"} <= set(sites)


def test_training_moves_the_loss(trained: dict[str, Any]) -> None:
    assert trained["losses"][-1] < trained["losses"][0]
    assert len(lora_fx.branches(trained["gm"])) == 10


def test_trained_injected_and_merged_equal_hand_merge(trained: dict[str, Any]) -> None:
    x = torch.randn(3, 7, 6, generator=torch.Generator().manual_seed(2))  # new batch and length
    with torch.no_grad():
        want = hand_merge(trained["base"], trained["gm"])(x)
        torch.testing.assert_close(trained["gm"](x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lora_fx.merge(trained["gm"])(x), want, rtol=1e-5, atol=1e-5)
        assert (want - trained["base"](x)).abs().max() > 1e-3


def test_trained_merged_onnx_equals_hand_merge(trained: dict[str, Any]) -> None:
    """ORT == hand merge within 1e-4, histogram == base (asserted in check_merged_onnx)."""
    assert trained["onnx_merged"].op_histogram == trained["onnx_base"].op_histogram


def test_in_proj_and_feed_forward_equal_peft() -> None:
    base = Encoder().eval()
    cfg = lora_fx.LoraConfig(r=2, lora_alpha=4, target_modules=["in_proj_weight", "linear1",
                                                                "linear2"])
    gm = lora_fx.inject(base, (X,), cfg)
    randomize_lora(gm, seed=5, scale=0.2)
    ref = peft_twin(base, gm)  # out_proj's B stays 0 there: its double count adds nothing
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            want = ref(X)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    with torch.no_grad():
        torch.testing.assert_close(gm(X), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lora_fx.merge(gm)(X), want, rtol=1e-5, atol=1e-5)
        assert (want - base(X)).abs().max() > 1e-3


MODEL_FILE = '''
import torch
from torch import nn

def build_model():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()

def example_inputs():
    return (torch.randn(2, 5, 16),)
'''


def test_inspect_lists_transformer_encoder_attention_sites(tmp_path: Path) -> None:
    path = tmp_path / "model.py"
    path.write_text(MODEL_FILE)
    result = CliRunner().invoke(cli, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    sites = {s["name"]: s for s in json.loads(result.output)["sites"]}
    for i in (0, 1):
        assert sites[f"layers.{i}.self_attn.in_proj_weight"]["peft"] is True
        assert sites[f"layers.{i}.self_attn.out_proj"]["peft"] is True
        assert sites[f"layers.{i}.linear1"]["peft"] is True
    table = CliRunner().invoke(cli, ["inspect", str(path)])
    assert "layers.0.self_attn.in_proj_weight" in table.output and "peft" in table.output


def test_multihead_attention_inside_a_traceable_model_is_opened() -> None:
    """symbolic_trace would keep nn.MultiheadAttention as a leaf; capture traces into it."""

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(6, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x)[0]

    names = {s.name for s in find_sites(lora_fx.capture(Wrap().eval(), (X,)))[0]}
    assert names == {"attn.in_proj_weight", "attn.out_proj"}


def test_peft_refuses_in_proj_weight_adapters_loudly(tmp_path: Path) -> None:
    """lorafx names the site in_proj_weight; PEFT has no such module and refuses the adapter
    instead of loading a different function (its MHA LoRA keys live on the module)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 3, 8)
    gm = lora_fx.inject(layer, (x,), lora_fx.LoraConfig(r=2, target_modules=["in_proj_weight"]))
    lora_fx.save_adapter(gm, tmp_path / "a")
    with pytest.raises(ValueError, match="not found in the base model"):
        peft.PeftModel.from_pretrained(copy.deepcopy(layer), tmp_path / "a")
    again = lora_fx.load_adapter(layer, (x,), tmp_path / "a")
    assert list(lora_fx.branches(again)) == ["self_attn.in_proj_weight"]
