"""Adapter surgery: SVD resize (Eckart-Young) and combine against PEFT's add_weighted_adapter.

Every ΔW = s·B@A is computed here from the raw factors: for the adapters made here s is written
in the test (alpha / r, alpha / sqrt(r) with rsLoRA); an output of resize or combine declares
lora_alpha with no alpha_pattern and no rsLoRA, so its s is lora_alpha / k for a site of rank k.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lora_fx.adapter.peft import Adapter, read_adapter, write_adapter
from lora_fx.adapter.surgery import combine, resize
from lora_fx.config import LoraConfig
from lora_fx.errors import LoraFxError
from tests.helpers import lora_scale

SHAPES = {"0": (12, 16), "2": (10, 12)}  # the Linear layers of the PEFT reference model


def make_adapter(seed: int, r: int = 4, alpha: float = 8, sites: dict[str, tuple[int, ...]]
                 | None = None, **config: object) -> Adapter:
    """Random A and random B (never B = 0) for every site; 4-tuples are conv (out, in, kh, kw)."""
    gen = torch.Generator().manual_seed(seed)
    sites = SHAPES if sites is None else sites
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(sites),
                     **config)  # type: ignore[arg-type]
    lora = {}
    for site, shape in sites.items():
        k = cfg.rank_for(site)
        a = torch.randn(k, *shape[1:], generator=gen) * 0.3
        b = torch.randn(shape[0], k, *([1] * (len(shape) - 2)), generator=gen) * 0.3
        lora[site] = (a, b)
    return Adapter(cfg, lora)


def np_delta(adapter: Adapter, site: str, s: float) -> np.ndarray:
    """s · B @ A in float64, computed here from the raw factors."""
    a, b = adapter.lora[site]
    return s * b.double().flatten(1).numpy() @ a.double().flatten(1).numpy()


def out_delta(adapter: Adapter, site: str) -> np.ndarray:
    """ΔW of a resize / combine output: s = lora_alpha / k, k = the site's rank (A's rows)."""
    config = adapter.config
    assert not config.use_rslora and not config.alpha_pattern
    return np_delta(adapter, site, config.lora_alpha / adapter.lora[site][0].shape[0])


# --- resize ----------------------------------------------------------------------------------

def test_resize_error_equals_tail_energy() -> None:
    adapter = make_adapter(0, r=6, alpha=4, sites={"w": (20, 24), "v": (16, 24)},
                           use_rslora=True, alpha_pattern={"v": 2.0})
    scales = {"w": lora_scale(4, 6, rslora=True), "v": lora_scale(2.0, 6, rslora=True)}
    small, kept = resize(adapter, 2)
    assert small.config.r == 2 and small.config.lora_alpha == 2 and not small.config.use_rslora
    assert small.config.rank_pattern == {} and small.config.alpha_pattern == {}
    for site in adapter.lora:
        a, b = small.lora[site]
        assert a.shape == (2, 24) and b.shape[1] == 2 and a.dtype == torch.float32
        full = np_delta(adapter, site, scales[site])
        svals = np.linalg.svd(full, compute_uv=False)
        err = np.linalg.norm(full - out_delta(small, site)) ** 2
        np.testing.assert_allclose(err, (svals[2:] ** 2).sum(), rtol=1e-4)
        np.testing.assert_allclose(kept[site], (svals[:2] ** 2).sum() / (svals ** 2).sum(),
                                   rtol=1e-10)
        u, s, vh = np.linalg.svd(full)  # it is the best rank-2 approximation itself
        np.testing.assert_allclose(out_delta(small, site), (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5)


def test_resize_to_full_rank_reproduces_delta(tmp_path: Path) -> None:
    adapter = make_adapter(1, r=4, alpha=16, sites={"w": (12, 8), "a.w": (6, 8)},
                           rank_pattern={"a.w": 2})
    same, kept = resize(adapter, 8)
    # r = the largest rank kept; site "w" is a suffix of "a.w", so its key is anchored
    assert same.config.r == 4
    assert {k: same.config.rank_for(k) for k in ("w", "a.w")} == {"w": 4, "a.w": 2}
    assert kept == {"w": pytest.approx(1.0), "a.w": pytest.approx(1.0)}
    write_adapter(same, tmp_path / "same")
    again = read_adapter(tmp_path / "same")  # rank_pattern survives the JSON round trip
    scales = {"w": lora_scale(16, 4), "a.w": lora_scale(16, 2)}
    for site in adapter.lora:
        assert again.lora[site][0].shape[0] == adapter.lora[site][0].shape[0]
        np.testing.assert_allclose(out_delta(again, site), np_delta(adapter, site, scales[site]),
                                   atol=1e-5)


def test_resize_clash_anchors_the_pattern_key() -> None:
    adapter = make_adapter(2, r=4, sites={"w": (6, 8), "a.w": (12, 8)}, rank_pattern={"^w": 2})
    out, _ = resize(adapter, 3)
    assert out.config.rank_pattern == {"^w": 2}
    assert out.config.rank_for("a.w") == 3 and out.config.rank_for("w") == 2


class Nested(nn.Module):
    """Sites "w" and "a.w": a plain rank_pattern key "w" would hit both."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(8, 6)
        self.a = nn.Module()
        self.a.w = nn.Linear(8, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.w(x), self.a.w(x)], dim=-1)


def test_peft_loads_resized_adapter_with_rank_pattern(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    adapter = make_adapter(5, r=4, sites={"w": (6, 8), "a.w": (12, 8)}, rank_pattern={"^w": 2})
    out, _ = resize(adapter, 3)
    write_adapter(out, tmp_path / "out")
    torch.manual_seed(0)
    pm = peft.PeftModel.from_pretrained(Nested(), str(tmp_path / "out"))
    for site in ("w", "a.w"):
        layer = pm.base_model.model.get_submodule(site)
        assert layer.r["default"] == out.lora[site][0].shape[0]
        torch.testing.assert_close(layer.get_delta_weight("default").double(),
                                   torch.from_numpy(out_delta(out, site)), atol=1e-6, rtol=1e-6)


def test_resize_conv_keeps_shapes_and_dtype() -> None:
    adapter = make_adapter(3, r=4, sites={"conv": (8, 3, 3, 3)})
    adapter.lora["conv"] = tuple(t.double() for t in adapter.lora["conv"])  # type: ignore[assignment]
    out, _ = resize(adapter, 2)
    a, b = out.lora["conv"]
    assert a.shape == (2, 3, 3, 3) and b.shape == (8, 2, 1, 1) and a.dtype == torch.float64
    full = np_delta(adapter, "conv", lora_scale(8, 4))
    u, s, vh = np.linalg.svd(full)
    np.testing.assert_allclose(out_delta(out, "conv"), (u[:, :2] * s[:2]) @ vh[:2], atol=1e-12)


def test_resize_refuses_bad_rank() -> None:
    for bad in (0, -1, 2.5):
        with pytest.raises(LoraFxError, match="rank"):
            resize(make_adapter(4), bad)  # type: ignore[arg-type]
    broken = make_adapter(4)
    broken.lora["0"][1][0, 0] = float("nan")
    with pytest.raises(LoraFxError, match="non-finite"):
        resize(broken, 2)


# --- combine against PEFT -------------------------------------------------------------------

def peft_combine(adapters: list[Adapter], weights: list[float], method: str,
                 rank: int | None) -> dict[str, torch.Tensor]:
    """ΔW per site of PEFT's add_weighted_adapter on a tiny model holding the same factors."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 10))
    names = [f"ad{i}" for i in range(len(adapters))]
    pm = None
    for name, adapter in zip(names, adapters, strict=True):
        cfg = peft.LoraConfig(r=adapter.config.r, lora_alpha=adapter.config.lora_alpha,
                              target_modules=sorted(adapter.lora))
        if pm is None:
            pm = peft.get_peft_model(model, cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
        for site, (a, b) in adapter.lora.items():
            layer = pm.base_model.model.get_submodule(site)
            layer.lora_A[name].weight.data.copy_(a)
            layer.lora_B[name].weight.data.copy_(b)
    assert pm is not None
    kwargs = {"svd_rank": rank} if rank is not None else {}
    pm.add_weighted_adapter(names, weights, "mix", combination_type=method, **kwargs)
    return {site: pm.base_model.model.get_submodule(site).get_delta_weight("mix").detach()
            for site in SHAPES}


@pytest.mark.parametrize(("method", "ranks", "weights", "rank"), [
    ("linear", (4, 4), [0.7, -1.3], None),
    ("cat", (4, 6), [0.7, -1.3], None),
    ("svd", (4, 6), [0.7, -1.3], None),
    ("svd", (4, 6), [1.5, 0.5], 3),
    ("svd", (4, 6), [1.5, 0.5], 10),
])
def test_combine_matches_peft(method: str, ranks: tuple[int, int], weights: list[float],
                              rank: int | None) -> None:
    adapters = [make_adapter(10, r=ranks[0], alpha=8), make_adapter(11, r=ranks[1], alpha=3)]
    expected = peft_combine(adapters, weights, method, rank)
    mixed = combine(adapters, weights, method=method, rank=rank)
    for site in SHAPES:
        torch.testing.assert_close(torch.from_numpy(out_delta(mixed, site)),
                                   expected[site].double(), atol=1e-5, rtol=1e-5)
    new_rank = {"linear": 4, "cat": 10, "svd": rank or 6}[method]
    assert mixed.config.r == new_rank == mixed.config.lora_alpha  # s = 1


def test_combine_cat_and_full_svd_are_exact_weighted_sums() -> None:
    one = make_adapter(12, r=4, alpha=8, use_rslora=True, rank_pattern={"2": 2})
    two = make_adapter(13, r=3, alpha=5, sites={"0": (12, 16), "x.0": (12, 16)})
    d1 = {"0": np_delta(one, "0", lora_scale(8, 4, rslora=True)),
          "2": np_delta(one, "2", lora_scale(8, 2, rslora=True))}
    d2 = {site: np_delta(two, site, lora_scale(5, 3)) for site in ("0", "x.0")}
    w = [0.5, -2.0]
    for method in ("cat", "svd"):
        mixed = combine([one, two], w, method=method, rank=100 if method == "svd" else None)
        assert sorted(mixed.lora) == ["0", "2", "x.0"]
        np.testing.assert_allclose(out_delta(mixed, "0"), w[0] * d1["0"] + w[1] * d2["0"],
                                   atol=1e-5)
        np.testing.assert_allclose(out_delta(mixed, "2"), w[0] * d1["2"], atol=1e-5)
        np.testing.assert_allclose(out_delta(mixed, "x.0"), w[1] * d2["x.0"], atol=1e-5)
    assert mixed.config.target_modules == ["0", "2", "x.0"]


def test_combine_single_adapter_svd_truncates(tmp_path: Path) -> None:
    adapter = make_adapter(14, r=4)
    write_adapter(adapter, tmp_path / "a")
    mixed = combine([tmp_path / "a"], [2.0], method="svd", rank=2)
    resized, _ = resize(adapter, 2)
    for site in SHAPES:
        np.testing.assert_allclose(out_delta(mixed, site), 2.0 * out_delta(resized, site),
                                   atol=1e-5, rtol=1e-5)


def test_combine_refusals() -> None:
    one, two = make_adapter(15, r=4), make_adapter(16, r=6)
    with pytest.raises(LoraFxError, match="equal ranks"):
        combine([one, two], [1.0, 1.0], method="linear")
    with pytest.raises(LoraFxError, match="one weight per adapter"):
        combine([one, two], [1.0])
    with pytest.raises(LoraFxError, match="not supported"):
        combine([one, two], [1.0, 1.0], method="ties")
    with pytest.raises(LoraFxError, match="'svd' only"):
        combine([one, two], [1.0, 1.0], method="cat", rank=3)
    with pytest.raises(LoraFxError, match="ΔW shapes"):
        combine([one, make_adapter(17, sites={"0": (12, 5)})], [1.0, 1.0], method="cat")
    with pytest.raises(LoraFxError, match="fan_in_fan_out"):
        combine([one, make_adapter(18, fan_in_fan_out=True)], [1.0, 1.0])
