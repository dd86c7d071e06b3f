"""Expert sites (issue 26): every form of a linear op reading one expert, or a per-row gather
of experts, of a 3-D parameter fires in both capture paths and gives PEFT's target_parameters
output (PEFT's ParamWrapper adds s·ΔW_e to the stack itself: the reference)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers.integrations.moe  # noqa: F401 - registers transformers::grouped_mm_fallback
from torch import nn

import lora_fx
from lora_fx.match.matcher import find_sites, weight_readers
from lora_fx.match.peft_reach import peft_reachable
from tests.helpers import randomize_lora

E = 3
GROUPED = torch.ops.transformers.grouped_mm_fallback  # transformers' grouped experts op


class Stack(nn.Module):
    """Two expert stacks, w_oi [E, out 6, in 8] (as Mixtral) and w_io [E, in 8, out 6], and one
    expert form per case in its own forward (PEFT's ParamWrapper applies where the module owning
    the parameter runs); rows x [S, 8] routed to ids = f(x) (data, not constants)."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.w_oi = nn.Parameter(torch.randn(E, 6, 8))
        self.w_io = nn.Parameter(torch.randn(E, 8, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: PLR0911 - one form per case
        w_oi, w_io, c = self.w_oi, self.w_io, self.case
        ids = (x[:, 0].abs() * 10).long() % E
        if c == "F.linear(x, W[e])":
            return sum(F.linear(x, w_oi[e]) * (e + 1) for e in range(E))  # type: ignore
        if c == "x @ W[e]":
            return sum(torch.matmul(x, w_io[e]) * (e + 1) for e in range(E))  # type: ignore
        if c == "x @ W[e].t()":
            return sum(torch.matmul(x, w_oi[e].t()) * (e + 1) for e in range(E))  # type: ignore
        if c == "bmm(W[ids], x)":
            return torch.bmm(w_oi[ids], x.unsqueeze(-1)).squeeze(-1)
        if c == "bmm(x, W[ids])":
            return torch.bmm(x.unsqueeze(1), w_io[ids]).squeeze(1)
        if c == "bmm(x, W[ids].mT)":
            return torch.bmm(x.unsqueeze(1), w_oi[ids].transpose(1, 2)).squeeze(1)
        if c == "bmm(x, W.mT[ids])":
            return torch.bmm(x.unsqueeze(1), w_oi.transpose(-1, -2)[ids]).squeeze(1)
        if c.startswith("grouped_mm"):  # rows sorted by expert, blocks ending at offs
            ids, order = ids.sort()
            offs = torch.cumsum(torch.histc(ids.float(), bins=E, min=0, max=E - 1), 0).int()
            w = w_oi.transpose(-2, -1) if c == "grouped_mm(x, W.mT, offs)" else w_io
            return GROUPED(x[order], w, offs)[order.argsort()]
        q = x.view(-1, 2, 4)
        return torch.bmm(q, q.transpose(1, 2)).flatten(1)  # attention scores: no site


class ExpertOp(nn.Module):
    def __init__(self, case: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.experts = Stack(case)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x) * 2


# case: (parameter, layout, weight on the left, uses)
CASES = {
    "F.linear(x, W[e])": ("w_oi", "out_in", False, E),
    "x @ W[e]": ("w_io", "in_out", False, E),
    "x @ W[e].t()": ("w_oi", "out_in", False, E),
    "bmm(W[ids], x)": ("w_oi", "out_in", True, 1),
    "bmm(x, W[ids])": ("w_io", "in_out", False, 1),
    "bmm(x, W[ids].mT)": ("w_oi", "out_in", False, 1),
    "bmm(x, W.mT[ids])": ("w_oi", "out_in", False, 1),
    "grouped_mm(x, W.mT, offs)": ("w_oi", "out_in", False, 1),
    "grouped_mm(x, W, offs)": ("w_io", "in_out", False, 1),
}


def rows(seed: int = 0) -> torch.Tensor:
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["symbolic_trace", "export"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_expert_form_is_a_site_with_its_expert_axis(case: str, method: str) -> None:
    param, layout, left, uses = CASES[case]
    gm = lora_fx.capture(ExpertOp(case), (rows(),), method=method)
    sites, skips = find_sites(gm)
    assert not skips
    assert [s.name for s in sites] == [f"experts.{param}"] * uses  # one name: one branch
    site = sites[0]
    assert (site.kind, site.layout, site.weight_left, site.experts) == ("experts", layout, left, E)
    assert site.grouped == case.startswith("grouped_mm")
    assert (site.in_features, site.out_features) == (8, 6)
    if uses > 1:
        assert [s.expert_index for s in sites] == list(range(E))
    assert peft_reachable(site)  # target_parameters: the op runs in the stack's own module
    stack = gm.get_parameter(f"experts.{param}")  # its readers are the ops, not the selections
    assert set(weight_readers(gm)[id(stack)]) == {s.node for s in sites}


@pytest.mark.parametrize("method", ["symbolic_trace", "export"])
def test_bmm_of_two_activations_is_not_a_site(method: str) -> None:
    gm = lora_fx.capture(ExpertOp("attention"), (rows(),), method=method)
    assert find_sites(gm) == ([], [])


@pytest.mark.parametrize("case", sorted(CASES))
def test_expert_branch_gives_peft_target_parameters_output(case: str) -> None:
    import peft  # the reference implementation (tests only)

    param = CASES[case][0]
    model, x = ExpertOp(case).eval(), rows()
    cfg = dict(r=2, lora_alpha=6, target_parameters=[f"experts.{param}"])
    gm = lora_fx.inject(model, (x,), lora_fx.LoraConfig(**cfg))
    randomize_lora(gm, seed=3, scale=0.5)
    ref = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg)).eval()
    branch = lora_fx.branches(gm)[f"experts.{param}"]
    ref.load_state_dict({f"base_model.model.experts.lora_{ab}.default.weight":
                         getattr(branch, f"lora_{ab}").weight.detach() for ab in "AB"},
                        strict=False)
    with torch.no_grad():
        want = ref(x)
        assert (want - model(x)).abs().max() > 0.1  # the adapter moves the output
        torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lora_fx.merge(gm)(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["x @ W[e]", "bmm(x, W[ids])", "grouped_mm(x, W, offs)"])
def test_transposed_stack_is_oriented_as_peft(case: str) -> None:
    """A module saying ``is_transposed`` (GPT-OSS: W [E, in, out]) gets PEFT's A [r·E, in],
    B [out, r·E] and PEFT's output."""
    import peft  # the reference implementation (tests only)

    model, x = ExpertOp(case).eval(), rows()
    model.experts.is_transposed = True
    cfg = dict(r=2, lora_alpha=6, target_parameters=["experts.w_io"])
    gm = lora_fx.inject(model, (x,), lora_fx.LoraConfig(**cfg))
    randomize_lora(gm, seed=4, scale=0.5)
    branch = lora_fx.branches(gm)["experts.w_io"]
    assert tuple(branch.lora_A.weight.shape) == (2 * E, 8)
    assert tuple(branch.lora_B.weight.shape) == (6, 2 * E)
    ref = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg)).eval()
    ref.load_state_dict({f"base_model.model.experts.lora_{ab}.default.weight":
                         getattr(branch, f"lora_{ab}").weight.detach() for ab in "AB"},
                        strict=False)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lora_fx.merge(gm)(x), ref(x), rtol=1e-5, atol=1e-5)
