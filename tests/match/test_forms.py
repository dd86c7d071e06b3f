"""Every matcher form fires, in both capture paths, and merges exactly.

References are hand-written here: y + s·B(A(x)) on activations (per form, with the geometry
of the op as the model writes it), and W + ΔW on a copy of the base model for the ONNX check
(tests/helpers.py). The scale s = alpha / r and each weight's layout are written in the test,
never read from lorafx.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import lora_fx
from lora_fx.capture.trace import CAPTURE_KEY
from lora_fx.graph.state import NODE_KEY, require_state
from lora_fx.match.matcher import find_sites
from lora_fx.match.peft_reach import peft_reachable
from tests.helpers import (
    check_merged_onnx,
    factors,
    hand_merged,
    lora_scale,
    peft_model_like,
    randomize_lora,
)

CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
F_CONV2D = {"stride": 1, "padding": 2, "dilation": 2}  # OneOp's functional conv


# --- one module per form ------------------------------------------------------------------------
class OneOp(nn.Module):
    """One op of form ``case`` (see CASES), so that y + Δ can be written by hand."""

    def __init__(self, case: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.case = case
        self.w_oi = nn.Parameter(torch.randn(6, 8))
        self.w_io = nn.Parameter(torch.randn(8, 6))
        self.bias = nn.Parameter(torch.randn(6))
        self.lin = nn.Linear(8, 6)
        self.c1, self.c2, self.c3 = nn.Conv1d(3, 5, 3), nn.Conv2d(3, 5, 3, stride=2, padding=1), \
            nn.Conv3d(2, 4, 2)
        self.w_conv = nn.Parameter(torch.randn(5, 3, 3, 3))
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.w_emb = nn.Parameter(torch.randn(11, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: PLR0911 - one op per case
        c = self.case
        if c == "nn.Linear":
            return self.lin(x)
        if c == "F.linear":
            return F.linear(x, self.w_oi, self.bias)
        if c == "x@W":
            return x @ self.w_io
        if c == "x@W.t()":
            return x @ self.w_oi.t()
        if c == "matmul(x,W.T)":
            return torch.matmul(x, self.w_oi.T)
        if c == "mm":
            return torch.mm(x, self.w_io)
        if c == "addmm":
            return torch.addmm(self.bias, x, self.w_io)
        if c in ("nn.Conv1d", "nn.Conv2d", "nn.Conv3d"):
            return getattr(self, f"c{c[-2]}")(x)
        if c == "F.conv2d":
            return F.conv2d(x, self.w_conv, **F_CONV2D)
        if c == "nn.Embedding":
            return self.emb(x)
        return F.embedding(x, self.w_emb)


IDS = torch.tensor([[0, 3, 10, 3], [1, 2, 0, 7]])
X2 = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
CASES: dict[str, tuple[torch.Tensor, str, str, str, str, bool]] = {
    # case: (input, form when traced, form when exported, kind, layout, PEFT reaches it)
    "nn.Linear": (X2, "nn.Linear", "F.linear", "linear", "out_in", True),
    "F.linear": (X2, "F.linear", "F.linear", "linear", "out_in", False),
    "x@W": (X2, "matmul", "matmul", "linear", "in_out", False),
    "x@W.t()": (X2, "matmul", "matmul", "linear", "out_in", False),
    "matmul(x,W.T)": (X2, "matmul", "matmul", "linear", "out_in", False),
    "mm": (X2, "matmul", "matmul", "linear", "in_out", False),
    "addmm": (X2, "addmm", "addmm", "linear", "in_out", False),
    "nn.Conv1d": (torch.randn(2, 3, 10), "nn.Conv1d", "conv1d", "conv", "out_in", True),
    "nn.Conv2d": (torch.randn(2, 3, 9, 9), "nn.Conv2d", "conv2d", "conv", "out_in", True),
    "nn.Conv3d": (torch.randn(1, 2, 4, 4, 4), "nn.Conv3d", "conv3d", "conv", "out_in", True),
    "F.conv2d": (torch.randn(2, 3, 9, 9), "conv2d", "conv2d", "conv", "out_in", False),
    "nn.Embedding": (IDS, "nn.Embedding", "embedding", "embedding", "in_out", True),
    "F.embedding": (IDS, "embedding", "embedding", "embedding", "in_out", False),
}


def conv_geometry(model: OneOp, case: str) -> dict[str, Any]:
    """Stride, padding and dilation of the case's conv, as the model applies it."""
    if case == "F.conv2d":
        return F_CONV2D
    conv = getattr(model, f"c{case[-2]}")
    return {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}


def hand_delta(model: OneOp, case: str, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               s: float) -> torch.Tensor:
    """Δ(x) written out per kind: s·x Aᵀ Bᵀ, s·conv1×1(conv(x, A), B) with A in the op's
    geometry, s·Aᵀ[ids] Bᵀ."""
    kind = CASES[case][3]
    if kind == "embedding":
        return s * (a.T[x] @ b.T)
    if kind == "conv":
        conv = CONVS[a.dim() - 2]
        return s * conv(conv(x, a, **conv_geometry(model, case)), b)
    return s * (x @ a.T @ b.T)


@pytest.mark.parametrize("method", ["symbolic_trace", "export"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_form_fires_and_merges_exactly(case: str, method: str) -> None:
    x, traced_form, exported_form, kind, layout, peft = CASES[case]
    model = OneOp(case).eval()
    base = lora_fx.capture(model, (x,), method=method)
    sites, skips = find_sites(base)
    assert len(sites) == 1 and not skips, (sites, skips)
    site = sites[0]
    assert (site.form, site.kind, site.layout) == (
        traced_form if method == "symbolic_trace" else exported_form, kind, layout)
    assert peft_reachable(site) is peft
    gm = lora_fx.inject(base, (x,), lora_fx.LoraConfig(r=2, lora_alpha=3,
                                                      target_modules=[site.name]))
    randomize_lora(gm, seed=3, scale=0.3)
    a, b = factors(gm, site.name)
    with torch.no_grad():
        want = model(x) + hand_delta(model, case, x, a, b, lora_scale(3, 2))
        injected, merged_gm = gm(x), lora_fx.merge(gm)
        merged = merged_gm(x)
    torch.testing.assert_close(injected, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, want, rtol=1e-5, atol=1e-5)
    assert not any(NODE_KEY in n.meta for n in merged_gm.graph.nodes)
    assert (injected - model(x)).abs().max() > 1e-3  # the branch really acts


class AllForms(nn.Module):
    """Every form in one model: embedding → linears of each form → conv."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(13, 8)
        self.w_emb = nn.Parameter(torch.randn(13, 8) * 0.1)
        self.lin = nn.Linear(8, 8)
        self.w_oi = nn.Parameter(torch.randn(8, 8) * 0.3)
        self.w_io = nn.Parameter(torch.randn(8, 8) * 0.3)
        self.w_t = nn.Parameter(torch.randn(8, 8) * 0.3)
        self.bias = nn.Parameter(torch.randn(8))
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.w_conv = nn.Parameter(torch.randn(4, 8, 3) * 0.2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) + F.embedding(ids, self.w_emb)        # [B, T, 8]
        h = torch.tanh(self.lin(h))
        h = torch.tanh(F.linear(h, self.w_oi, self.bias))
        h = torch.tanh(h @ self.w_io) + h @ self.w_t.t()
        c = self.conv(h.transpose(1, 2))                         # [B, 8, T]
        return F.conv1d(torch.relu(c), self.w_conv, padding=1)   # [B, 4, T]


ALL_FORMS_LAYOUTS = {"emb": "in_out", "w_emb": "in_out", "lin": "out_in", "w_oi": "out_in",
                     "w_io": "in_out", "w_t": "out_in", "conv": "out_in", "w_conv": "out_in"}


@pytest.fixture(scope="module")
def all_forms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    model = AllForms().eval()
    ids = torch.randint(0, 13, (2, 5), generator=torch.Generator().manual_seed(0))
    cfg = lora_fx.LoraConfig(r=3, lora_alpha=6, target_modules=".*")
    gm = lora_fx.inject(lora_fx.capture(model, (ids,), method="export"), (ids,), cfg)
    base = lora_fx.capture(model, (ids,), method="export")  # inject consumed the first one
    randomize_lora(gm, seed=7, scale=0.2)
    ref = hand_merged(model, gm, ALL_FORMS_LAYOUTS, lora_scale(6, 3))
    with torch.no_grad():
        want = ref(ids)
    onnx = check_merged_onnx(gm, base, (ids,), want, tmp_path_factory.mktemp("forms"))
    return {"model": model, "gm": gm, "ids": ids, "want": want, **onnx}


def test_all_forms_injected_equals_hand_merge(all_forms: dict[str, Any]) -> None:
    gm = all_forms["gm"]
    forms = {r.form for r in require_state(gm).sites.values()}
    assert forms == {"embedding", "F.linear", "matmul", "conv1d"}
    assert len(require_state(gm).sites) == 8  # 2 embeddings, 4 linear, 2 conv
    with torch.no_grad():
        torch.testing.assert_close(gm(all_forms["ids"]), all_forms["want"], rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(lora_fx.merge(gm)(all_forms["ids"]), all_forms["want"],
                                   rtol=1e-5, atol=1e-5)


def test_all_forms_merged_onnx_is_the_base_graph(all_forms: dict[str, Any]) -> None:
    """ORT == hand merge within 1e-4 and op histogram == base (checked in the fixture)."""
    assert all_forms["onnx_merged"].op_histogram == all_forms["onnx_base"].op_histogram
    with torch.no_grad():
        base_out = all_forms["model"](all_forms["ids"])
    assert (all_forms["onnx_got"][0] - base_out).abs().max() > 1e-3


class Twice(nn.Module):
    """One nn.Linear called twice (weight sharing by reuse, not by tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential()
        self.inner.shared = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inner.shared(torch.tanh(self.inner.shared(x)))))


def test_module_called_twice_is_one_site_like_peft() -> None:
    """Both calls get the same branch, as PEFT's wrapped module; merge folds it once."""
    model = Twice().eval()
    gm = lora_fx.inject(model, (X2,), lora_fx.LoraConfig(r=2, target_modules=["shared"]))
    assert list(require_state(gm).sites) == ["inner.shared"]
    randomize_lora(gm, seed=2, scale=0.3)
    peft = peft_model_like(model, gm, r=2, target_modules=["shared"])
    with torch.no_grad():
        want = peft(X2)
        torch.testing.assert_close(gm(X2), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lora_fx.merge(gm)(X2), want, rtol=1e-5, atol=1e-5)


class Decomposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 3, 2)
        self.lin = nn.Linear(5, 6)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.up(self.conv(x)), self.lin(y)


def test_core_aten_forms_after_decomposition() -> None:
    """aten.convolution (transposed: refused) and addmm(b, x, permute(W)) of a decomposed
    export are sites too."""
    model = Decomposed().eval()
    args = (torch.randn(2, 3, 8, 8), torch.randn(2, 5))
    exported = torch.export.export(model, args).run_decompositions().module()
    gm = fx.GraphModule(exported, exported.graph)
    gm.meta[CAPTURE_KEY] = "export"
    sites, skips = find_sites(gm)
    assert [(s.name, s.form, s.layout) for s in sites] == [("conv", "conv2d", "out_in"),
                                                           ("lin", "addmm", "out_in")]
    assert sites[0].geometry["stride"] == (2, 2)
    assert [(k.name, k.reason.split(":")[0]) for k in skips] == [("up", "transposed convolution")]
    injected = lora_fx.inject(gm, args, lora_fx.LoraConfig(r=2, lora_alpha=4,
                                                           target_modules=["conv", "lin"]))
    randomize_lora(injected, seed=1, scale=0.3)
    with torch.no_grad():  # conv W [out, in, k, k]; the linear's W [out, in], read permuted
        want = hand_merged(model, injected, {"conv": "out_in", "lin": "out_in"},
                           lora_scale(4, 2))(*args)
        for got in (injected(*args), lora_fx.merge(injected)(*args)):
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
