"""Rank analysis (LoRA paper, section 7) checked against independent computations written here:
SVDs of s·B@A with s = alpha / r (alpha / sqrt(r) with rsLoRA) computed in the test, projector
formulas for the subspace similarity, numpy for the amplification."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_fx.adapter.analysis import (
    amplification,
    analyze,
    effective_rank,
    plot,
    random_baseline,
    spectrum,
    subspace_similarity,
)
from lora_fx.adapter.peft import Adapter, write_adapter
from lora_fx.config import LoraConfig
from lora_fx.errors import LoraFxError
from tests.helpers import lora_scale

SHAPES = {"blocks.0.w_in": (24, 16), "blocks.0.w_out": (16, 24), "head": (10, 16)}


def make_adapter(seed: int, r: int = 4, sites: dict[str, tuple[int, int]] | None = None,
                 **config: object) -> Adapter:
    """Random A and random B (never B = 0) for every site."""
    gen = torch.Generator().manual_seed(seed)
    sites = SHAPES if sites is None else sites
    cfg = LoraConfig(r=r, lora_alpha=config.pop("lora_alpha", 8),  # type: ignore[arg-type]
                     target_modules=sorted(sites), **config)  # type: ignore[arg-type]
    lora = {}
    for site, (out, inp) in sites.items():
        k = cfg.rank_for(site)
        lora[site] = (torch.randn(k, inp, generator=gen), torch.randn(out, k, generator=gen))
    return Adapter(cfg, lora)


def numpy_phi(a1: np.ndarray, a2: np.ndarray) -> np.ndarray:
    """φ(i, j) = trace(P1_i P2_j) / min(i, j) with P = U Uᵀ the projector on the top-i right
    singular vectors, written independently of the library."""
    v1 = np.linalg.svd(a1)[2]
    v2 = np.linalg.svd(a2)[2]
    out = np.zeros((a1.shape[0], a2.shape[0]))
    for i in range(1, a1.shape[0] + 1):
        p1 = v1[:i].T @ v1[:i]
        for j in range(1, a2.shape[0] + 1):
            p2 = v2[:j].T @ v2[:j]
            out[i - 1, j - 1] = np.trace(p1 @ p2) / min(i, j)
    return out


def numpy_amplification(delta: np.ndarray, w: np.ndarray, r: int) -> dict[str, float]:
    """‖U_rᵀ W V_r‖_F along ΔW's top-r singular directions (the paper's Table 7), W's own best
    r directions, and the factor ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F."""
    u, _, vh = np.linalg.svd(delta)
    along = np.linalg.norm(u[:, :r].T @ w @ vh[:r].T)
    sw = np.linalg.svd(w, compute_uv=False)
    return {"delta_dirs": along, "weight_dirs": np.sqrt((sw[:r] ** 2).sum()),
            "factor": np.linalg.norm(delta) / along}


def test_spectrum_matches_numpy_svd_of_scaled_delta() -> None:
    adapter = make_adapter(0, r=4, lora_alpha=6, rank_pattern={"head": 3},
                           alpha_pattern={"w_out": 2.0}, use_rslora=True)
    scales = {"blocks.0.w_in": lora_scale(6, 4, rslora=True),  # rsLoRA: alpha / sqrt(r)
              "blocks.0.w_out": lora_scale(2.0, 4, rslora=True),
              "head": lora_scale(6, 3, rslora=True)}
    assert scales.keys() == adapter.lora.keys()
    for site, (a, b) in adapter.lora.items():
        expected = torch.linalg.svdvals(scales[site] * b.double() @ a.double()).numpy()
        got = spectrum(adapter, site)
        assert len(got) == a.shape[0]
        np.testing.assert_allclose(got, expected[: a.shape[0]], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(expected[a.shape[0]:], 0.0, atol=1e-10)


def test_spectrum_unknown_site_is_refused() -> None:
    with pytest.raises(LoraFxError, match="'nope' is not in the adapter"):
        spectrum(make_adapter(0), "nope")


def test_effective_rank_on_constructed_spectra() -> None:
    svals = [3.0, 2.0, 1.0, 0.0]  # energies 9/14 = .64, 13/14 = .93, 14/14
    assert effective_rank(svals, 0.5) == 1
    assert effective_rank(svals, 0.9) == 2
    assert effective_rank(svals, 0.95) == 3
    assert effective_rank(svals, 1.0) == 3  # a zero singular value adds nothing
    assert effective_rank([1.0, 3.0, 2.0], 0.9) == 2  # order does not matter
    assert effective_rank([1.0, 1.0, 1.0, 1.0], 0.75) == 3  # exact tie counts
    assert effective_rank([0.0, 0.0], 0.9) == 0
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(LoraFxError, match="energy"):
            effective_rank(svals, bad)


def test_subspace_similarity_matches_projector_formula() -> None:
    gen = torch.Generator().manual_seed(1)
    a1, a2 = torch.randn(4, 32, generator=gen), torch.randn(7, 32, generator=gen)
    phi = subspace_similarity(a1, a2)
    assert phi.shape == (4, 7)
    np.testing.assert_allclose(phi, numpy_phi(a1.double().numpy(), a2.double().numpy()),
                               atol=1e-10)
    np.testing.assert_allclose(subspace_similarity(a2, a1), phi.T, atol=1e-12)
    assert (phi >= 0).all() and (phi <= 1).all()


def test_subspace_similarity_of_a_matrix_with_itself_is_one_on_the_diagonal() -> None:
    a = torch.randn(6, 20, generator=torch.Generator().manual_seed(2))
    phi = subspace_similarity(a, a)
    np.testing.assert_allclose(np.diag(phi), 1.0, atol=1e-12)
    assert (phi >= 0).all() and (phi <= 1).all()
    # a subspace of A's top directions, mixed by a random invertible r × r matrix, is the same
    mix = torch.randn(6, 6, generator=torch.Generator().manual_seed(3)) @ a
    np.testing.assert_allclose(subspace_similarity(a, mix)[-1, -1], 1.0, atol=1e-10)


def test_subspace_similarity_refuses_different_layers() -> None:
    with pytest.raises(LoraFxError, match="same layer"):
        subspace_similarity(torch.randn(2, 8), torch.randn(2, 9))


def test_random_baseline_is_seeded_and_near_max_ij_over_dim() -> None:
    base = random_baseline(4, 8, 64, seed=5)
    assert base.shape == (4, 8)
    np.testing.assert_array_equal(base, random_baseline(4, 8, 64, seed=5))
    assert not np.array_equal(base, random_baseline(4, 8, 64, seed=6))
    # E φ(i, j) = i·j / (dim · min(i, j)) = max(i, j) / dim for independent random subspaces
    mean = np.mean([random_baseline(4, 8, 64, seed=s) for s in range(30)], axis=0)
    i, j = np.meshgrid(np.arange(1, 5), np.arange(1, 9), indexing="ij")
    np.testing.assert_allclose(mean, np.maximum(i, j) / 64, atol=0.02)


def test_amplification_against_numpy() -> None:
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(12, 20, generator=gen, dtype=torch.float64)
    delta = torch.randn(12, 3, generator=gen, dtype=torch.float64) @ torch.randn(
        3, 20, generator=gen, dtype=torch.float64)
    amp = amplification(delta, w, r=3)
    ref = numpy_amplification(delta.numpy(), w.numpy(), r=3)
    np.testing.assert_allclose(amp["delta_dirs"], ref["delta_dirs"], rtol=1e-10)
    np.testing.assert_allclose(amp["weight_dirs"], ref["weight_dirs"], rtol=1e-10)
    np.testing.assert_allclose(amp["delta_fro"], np.linalg.norm(delta.numpy()), rtol=1e-10)
    np.testing.assert_allclose(amp["weight_fro"], np.linalg.norm(w.numpy()), rtol=1e-10)
    np.testing.assert_allclose(amp["factor"], amp["delta_fro"] / amp["delta_dirs"], rtol=1e-12)
    # W's own top directions maximise ‖Uᵀ W V‖_F over orthonormal frames
    assert amp["weight_dirs"] >= amp["delta_dirs"] and amp["weight_dirs"] >= amp["random_dirs"]


def test_amplification_of_delta_along_w_top_directions() -> None:
    w = torch.randn(10, 14, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    delta = 0.5 * u[:, :2] @ vh[:2]
    amp = amplification(delta, w, r=2)
    np.testing.assert_allclose(amp["delta_dirs"], amp["weight_dirs"], rtol=1e-10)
    with pytest.raises(LoraFxError, match="shape"):
        amplification(delta, w.T, r=2)


def test_analyze_one_adapter_with_weights(tmp_path: Path) -> None:
    adapter = make_adapter(6, r=4, rank_pattern={"head": 2})
    write_adapter(adapter, tmp_path / "a")
    gen = torch.Generator().manual_seed(7)
    weights = {f"{site}.weight": torch.randn(*shape, generator=gen)
               for site, shape in SHAPES.items()}
    result = analyze(tmp_path / "a", weights=weights)
    json.dumps(result, allow_nan=False)
    assert set(result["sites"]) == set(SHAPES) and "similarity" not in result
    head = result["sites"]["head"]
    assert head["rank"] == 2 and len(head["singular_values"]) == 2
    a, b = adapter.lora["head"]
    delta = lora_scale(8, 2) * b.double() @ a.double()  # head: rank 2, lora_alpha 8
    np.testing.assert_allclose(head["singular_values"], torch.linalg.svdvals(delta)[:2], rtol=1e-6)
    np.testing.assert_allclose(head["delta_fro"], float(delta.norm()), rtol=1e-6)
    np.testing.assert_allclose(head["weight_fro"], float(weights["head.weight"].norm()), rtol=1e-6)
    np.testing.assert_allclose(head["relative"], head["delta_fro"] / head["weight_fro"])
    ref = numpy_amplification(delta.numpy(), weights["head.weight"].double().numpy(), r=2)
    for key in ("delta_dirs", "weight_dirs", "factor"):
        np.testing.assert_allclose(head["amplification"][key], ref[key], rtol=1e-6)
    with pytest.raises(LoraFxError, match="no tensor for site"):
        analyze(adapter, weights={"head.weight": weights["head.weight"]})


def test_analyze_fan_in_fan_out_weights_are_transposed() -> None:
    adapter = make_adapter(8, sites={"c_attn": (12, 8)}, fan_in_fan_out=True)
    w = torch.randn(8, 12)  # HF Conv1D stores (in, out)
    result = analyze(adapter, weights={"c_attn.weight": w})
    np.testing.assert_allclose(result["sites"]["c_attn"]["amplification"]["weight_fro"],
                               float(w.norm()), rtol=1e-6)


def test_analyze_two_adapters(tmp_path: Path) -> None:
    one = make_adapter(9, r=4)
    two = make_adapter(10, r=8, sites={**SHAPES, "extra": (5, 16)})
    write_adapter(one, tmp_path / "one")
    write_adapter(two, tmp_path / "two")
    result = analyze(tmp_path / "one", str(tmp_path / "two"))
    json.dumps(result, allow_nan=False)
    assert result["adapters"] == [str(tmp_path / "one"), str(tmp_path / "two")]
    assert set(result["similarity"]) == set(SHAPES) == set(result["baseline"])
    assert set(result["sites2"]) == set(SHAPES) | {"extra"}
    for site in SHAPES:
        phi = np.asarray(result["similarity"][site])
        assert phi.shape == (4, 8) and np.asarray(result["baseline"][site]).shape == (4, 8)
        np.testing.assert_allclose(
            phi, numpy_phi(one.lora[site][0].double().numpy(), two.lora[site][0].double().numpy()),
            atol=1e-6)


def test_analyze_refuses_adapters_without_shared_sites(tmp_path: Path) -> None:
    write_adapter(make_adapter(11, sites={"a": (4, 4)}), tmp_path / "x")
    write_adapter(make_adapter(12, sites={"b": (4, 4)}), tmp_path / "y")
    with pytest.raises(LoraFxError) as err:
        analyze(tmp_path / "x", tmp_path / "y")
    assert str(tmp_path / "x") in str(err.value) and str(tmp_path / "y") in str(err.value)


def test_plot_writes_png_atomically(tmp_path: Path) -> None:
    sites = {f"layers.{i}.q": (12, 16) for i in range(5)}
    one, two = make_adapter(13, r=4, sites=sites), make_adapter(14, r=6, sites=sites)
    heat = plot(analyze(one, two), tmp_path / "phi.png", max_sites=3)
    spectra = plot(analyze(one), tmp_path / "spectra.out")  # format does not follow the name
    for path in (heat, spectra):
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phi.png", "spectra.out"]
    with pytest.raises(LoraFxError, match="phi.png is a file"):
        plot(analyze(one), tmp_path / "phi.png" / "x.png")
    made = plot(analyze(one), tmp_path / "missing" / "x.png")  # missing folders are made
    assert made.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
