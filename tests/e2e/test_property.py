"""Property tests over random architectures (hypothesis).

An architecture is a stack of layers of random widths: ``nn.Linear`` modules, functional
``F.linear(x, W)``, ``x @ W`` ([in, out] weights), ``x @ W.t()``, a ``Conv1d`` over the features
(not a LoRA site), ``nn.Dropout``, a square ``nn.Linear`` called twice and a square parameter
read twice (shared weights: never targeted, must stay untouched), random activations and
residual adds; some models carry a shape branch that symbolic_trace cannot follow, so they are
captured with torch.export. For random A and B at a random subset of sites, with random ranks
(rank_pattern), alphas and rsLoRA:

- injected == a hand merge written here (W' = W + s·B@A, or W + (s·B@A)ᵀ for [in, out] weights,
  in float64, with s computed here) == lora_fx.merge == ONNX Runtime on the merged export;
- merging twice changes nothing; merge never mutates the injected model nor the base model, so
  the injected model is the "unmerged" model, restored by simply keeping it;
- the merged ONNX file has the op histogram of the base model's export.

CI runs a fixed, derandomized handful of examples; ``HYPOTHESIS_PROFILE=deep`` runs many more,
randomized (failures print a reproduction blob).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lora_fx

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
_BASE = {"deadline": None, "database": None, "print_blob": True,
         "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
SETTINGS = {  # (eager examples, ONNX examples)
    "ci": ({**_BASE, "max_examples": 12, "derandomize": True},
           {**_BASE, "max_examples": 2, "derandomize": True}),
    "deep": ({**_BASE, "max_examples": 300}, {**_BASE, "max_examples": 25}),
}
EAGER, ONNX = SETTINGS.get(PROFILE, SETTINGS["ci"])

LINEAR_KINDS = ("linear", "flinear", "matmul", "matmul_t")
KINDS = LINEAR_KINDS + ("conv", "dropout", "shared_module", "tied")
ACTS = {"none": lambda x: x, "relu": F.relu, "tanh": torch.tanh, "gelu": F.gelu}


@dataclass
class Layer:
    kind: str
    d_in: int
    d_out: int
    bias: bool
    act: str
    residual: bool


@dataclass
class Arch:
    d_in: int
    seq: int | None              # None: inputs [batch, d]; else [batch, seq, d]
    layers: list[Layer]
    export: bool                 # a shape branch that only torch.export captures
    sites: dict[str, str] = field(default_factory=dict)   # target name -> weight layout


class Net(nn.Module):
    """The model an Arch describes; parameters ``l{i}`` (modules) and ``w{i}``/``b{i}``."""

    def __init__(self, arch: Arch, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.arch = arch
        for i, layer in enumerate(arch.layers):
            k, a, b = layer.kind, layer.d_in, layer.d_out
            if k in ("linear", "shared_module"):
                setattr(self, f"l{i}", nn.Linear(a, b, bias=layer.bias))
            elif k == "conv":
                setattr(self, f"l{i}", nn.Conv1d(1, 1, 3, padding=1))
            elif k == "dropout":
                setattr(self, f"l{i}", nn.Dropout(0.3))
            else:  # flinear / matmul_t: [out, in]; matmul: [in, out]; tied: [d, d]
                shape = (a, b) if k == "matmul" else (b, a)
                setattr(self, f"w{i}", nn.Parameter(torch.randn(shape) / math.sqrt(a)))
                if layer.bias and k == "flinear":
                    setattr(self, f"b{i}", nn.Parameter(torch.randn(b) * 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.arch.export and x.shape[0] > 1:  # symbolic_trace cannot branch on a shape
            x = x * 1.0
        for i, layer in enumerate(self.arch.layers):
            h = self._layer(i, layer, x)
            h = ACTS[layer.act](h)
            x = x + h if layer.residual else h
        return x

    def _layer(self, i: int, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        k = layer.kind
        if k in ("linear", "dropout"):
            return getattr(self, f"l{i}")(x)
        if k == "shared_module":
            return getattr(self, f"l{i}")(torch.tanh(getattr(self, f"l{i}")(x)))
        if k == "conv":
            return getattr(self, f"l{i}")(x.reshape(-1, 1, x.shape[-1])).reshape(x.shape)
        w = getattr(self, f"w{i}")
        if k == "flinear":
            return F.linear(x, w, getattr(self, f"b{i}", None))
        if k == "matmul":
            return x @ w
        if k == "matmul_t":
            return x @ w.t()
        return F.linear(torch.tanh(F.linear(x, w)), w)  # tied: one weight, two reads


@st.composite
def archs(draw: st.DrawFn) -> Arch:
    d = draw(st.integers(2, 8))
    arch = Arch(d, draw(st.none() | st.integers(1, 3)), [], draw(st.booleans()))
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(KINDS))
        square = kind in ("conv", "dropout", "shared_module", "tied")
        d_out = d if square else draw(st.integers(1, 8))
        residual = d_out == d and draw(st.booleans())
        arch.layers.append(Layer(kind, d, d_out, draw(st.booleans()),
                                 draw(st.sampled_from(sorted(ACTS))), residual))
        d = d_out
    if not any(layer.kind in LINEAR_KINDS for layer in arch.layers):
        arch.layers.append(Layer("linear", d, draw(st.integers(1, 8)), True, "none", False))
    for i, layer in enumerate(arch.layers):
        if layer.kind in LINEAR_KINDS:
            name = f"l{i}" if layer.kind == "linear" else f"w{i}"
            arch.sites[name] = "in_out" if layer.kind == "matmul" else "out_in"
    return arch


@dataclass
class Plan:
    targets: list[str]
    ranks: dict[str, int]
    alphas: dict[str, float]
    rslora: bool
    config: lora_fx.LoraConfig


@st.composite
def plans(draw: st.DrawFn, arch: Arch) -> Plan:
    names = sorted(arch.sites)
    targets = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    r = draw(st.integers(1, 4))
    alpha = draw(st.sampled_from([0.5, 1.0, 4.0, 16.0]))
    rank_pattern = draw(st.dictionaries(st.sampled_from(targets), st.integers(1, 5)))
    alpha_pattern = draw(st.dictionaries(st.sampled_from(targets), st.sampled_from([2.0, 8.0])))
    rslora = draw(st.booleans())
    config = lora_fx.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
        lora_dropout=draw(st.sampled_from([0.0, 0.2])), rank_pattern=dict(rank_pattern),
        alpha_pattern=dict(alpha_pattern))
    return Plan(targets, {t: rank_pattern.get(t, r) for t in targets},
                {t: alpha_pattern.get(t, alpha) for t in targets}, rslora, config)


def _inputs(arch: Arch, batch: int, seed: int) -> torch.Tensor:
    shape = (batch, arch.d_in) if arch.seq is None else (batch, arch.seq, arch.d_in)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _randomize(gm: nn.Module, seed: int) -> None:
    """Random A and B at every site (with B = 0 a broken merge would pass)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for branch in lora_fx.branches(gm).values():
            for w in (branch.lora_A.weight, branch.lora_B.weight):
                w.copy_(torch.randn(w.shape, generator=g) * 0.3)


def hand_merge(base: nn.Module, gm: nn.Module, arch: Arch, plan: Plan) -> nn.Module:
    """W' = W + s·B@A ([out, in]) or W + (s·B@A)ᵀ ([in, out]) in float64; s = α/r or α/√r."""
    ref = copy.deepcopy(base)
    branches = lora_fx.branches(gm)
    with torch.no_grad():
        for site in plan.targets:
            r, alpha = plan.ranks[site], plan.alphas[site]
            s = alpha / math.sqrt(r) if plan.rslora else alpha / r
            a = branches[site].lora_A.weight.double()
            b = branches[site].lora_B.weight.double()
            assert a.shape[0] == r and b.shape[1] == r  # rank_pattern honoured
            delta = s * (b @ a)
            w = ref.get_parameter(f"{site}.weight" if site.startswith("l") else site)
            w.copy_((w.double() + (delta.t() if arch.sites[site] == "in_out" else delta)).float())
    return ref.eval()


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _build(arch: Arch, plan: Plan, seed: int) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    base = Net(arch, seed).eval()
    x = _inputs(arch, 3, seed)
    gm = lora_fx.inject(base, (x,), plan.config)
    gm.graph.lint()
    assert gm.meta.get("lorafx_capture") == ("export" if arch.export else "symbolic_trace")
    gm.eval()
    with torch.no_grad():  # B = 0 at start: the base model (exactly, when traced)
        torch.testing.assert_close(gm(x), base(x), atol=1e-6 if arch.export else 0, rtol=0)
    _randomize(gm, seed)
    return base, gm, x


@given(data=st.data(), seed=st.integers(0, 2**16))
@settings(**EAGER)
def test_inject_merge_equals_hand_merge(data: st.DataObject, seed: int) -> None:
    arch = data.draw(archs(), label="arch")
    plan = data.draw(plans(arch), label="plan")
    base = Net(arch, seed).eval()
    base_state = _state(base)
    base, gm, x = _build(arch, plan, seed)
    ref = hand_merge(base, gm, arch, plan)
    x5 = _inputs(arch, 5, seed + 1)  # another batch size: the capture must not pin it
    with torch.no_grad():
        want, want5 = ref(x), ref(x5)
        unmerged = gm(x)
        torch.testing.assert_close(unmerged, want, atol=1e-5, rtol=1e-5)
        merged = lora_fx.merge(gm)
        merged.graph.lint()
        assert not [n for n in merged.graph.nodes if "lora" in n.meta]
        assert not any("lora" in name for name, _ in merged.named_parameters())
        got = merged(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged(x5), want5, atol=1e-5, rtol=1e-5)
        twice = lora_fx.merge(merged)
        assert torch.equal(twice(x), got)  # merging twice is a no-op
        assert torch.equal(gm(x), unmerged)  # the injected model is untouched: "unmerged"
        for k, v in base.state_dict().items():  # and so is the user's base model
            assert torch.equal(v, base_state[k]), k


@given(data=st.data(), seed=st.integers(0, 2**16))
@settings(**ONNX)
def test_merged_onnx_equals_hand_merge(data: st.DataObject, seed: int,
                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    import onnxruntime as ort

    from lora_fx.onnx.report import op_histogram

    arch = data.draw(archs(), label="arch")
    plan = data.draw(plans(arch), label="plan")
    base, gm, x = _build(arch, plan, seed)
    ref = hand_merge(base, gm, arch, plan)
    folder = tmp_path_factory.mktemp("onnx")
    lora_fx.export_onnx(gm, (x,), folder / "merged.onnx", merge=True, verify=False)
    lora_fx.export_onnx(lora_fx.capture(base, (x,)), (x,), folder / "base.onnx", verify=False)
    x5 = _inputs(arch, 5, seed + 1)
    sess = ort.InferenceSession(str(folder / "merged.onnx"), providers=["CPUExecutionProvider"])
    for inp in (x, x5):
        got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: inp.numpy()})[0])
        with torch.no_grad():
            torch.testing.assert_close(got, ref(inp), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got, gm(inp), atol=1e-4, rtol=1e-4)
    import onnx

    hist = [op_histogram(onnx.load(str(folder / f"{n}.onnx"))) for n in ("merged", "base")]
    assert hist[0] == hist[1]
    assert np.isfinite(got.numpy()).all()


def test_profiles_are_fixed_in_ci() -> None:
    """CI is reproducible: derandomized (a fixed seed) and a small number of examples."""
    eager, onnx = SETTINGS["ci"]
    assert eager["derandomize"] and onnx["derandomize"]
    assert eager["max_examples"] <= 20 and onnx["max_examples"] <= 3
    assert SETTINGS["deep"][0]["max_examples"] > eager["max_examples"]


def test_profile_name_is_known() -> None:
    assert PROFILE in SETTINGS, f"HYPOTHESIS_PROFILE={PROFILE!r}: use one of {sorted(SETTINGS)}"

