"""`lorafx analyze`, `resize` and `combine` through the real CLI (subprocess), checked against
independent numpy computations on the adapter files."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import lora_fx
from tests.helpers import TINY, randomize_lora, run_cli, tiny_mlp

SITES = ["head", "w_in", "w_mid", "w_up"]


def lorafx(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The installed ``lorafx`` console script (cli.py registers analyze, resize, combine)."""
    return run_cli(*args, check=check)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Adapters of rank 4 and 8 on every site of the tiny MLP, random A and B (never B = 0)."""
    out = tmp_path_factory.mktemp("adapters")
    model, _ = tiny_mlp()
    x = torch.randn(8, 32)
    for r, seed in ((4, 1), (8, 2)):
        gm = lora_fx.inject(model, (x,), lora_fx.LoraConfig(r=r, lora_alpha=2 * r + 1,
                                                            target_modules=SITES))
        randomize_lora(gm, seed=seed, scale=0.3)
        lora_fx.save_adapter(gm, out / f"r{r}")
    return {"dir": out, "model": model}


def factors(directory: Path, site: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(A, B, s) read straight from the files, in float64."""
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    cfg = json.loads((directory / "adapter_config.json").read_text())
    a = tensors[f"base_model.model.{site}.lora_A.weight"].astype(np.float64)
    b = tensors[f"base_model.model.{site}.lora_B.weight"].astype(np.float64)
    return a, b, cfg["lora_alpha"] / cfg["r"]


def numpy_phi(a1: np.ndarray, a2: np.ndarray) -> np.ndarray:
    """φ(i, j) = ‖V1[:i] V2[:j]ᵀ‖²_F / min(i, j), Vk the right-singular vectors (rows)."""
    v1, v2 = np.linalg.svd(a1)[2], np.linalg.svd(a2)[2]
    phi = np.zeros((a1.shape[0], a2.shape[0]))
    for i in range(1, a1.shape[0] + 1):
        for j in range(1, a2.shape[0] + 1):
            phi[i - 1, j - 1] = np.sum((v1[:i] @ v2[:j].T) ** 2) / min(i, j)
    return phi


def test_analyze_json_similarity_equals_numpy_and_plot_is_png(adapters: dict[str, Any],
                                                             tmp_path: Path) -> None:
    d = adapters["dir"]
    png = tmp_path / "phi.png"
    proc = lorafx("analyze", str(d / "r4"), str(d / "r8"), "--json", "--plot", str(png))
    result = json.loads(proc.stdout)  # stdout holds the JSON and nothing else
    assert sorted(result["similarity"]) == SITES
    for site in SITES:
        a4, b4, s4 = factors(d / "r4", site)
        a8, _, _ = factors(d / "r8", site)
        phi = np.asarray(result["similarity"][site])
        assert phi.shape == (4, 8)
        np.testing.assert_allclose(phi, numpy_phi(a4, a8), atol=1e-10)
        want = np.linalg.svd(s4 * b4 @ a4, compute_uv=False)[:4]
        np.testing.assert_allclose(result["sites"][site]["singular_values"], want, rtol=1e-9)
        assert np.asarray(result["baseline"][site]).shape == (4, 8)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(str(png))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0.05  # a real picture, not a blank canvas


def test_analyze_with_model_reports_norms_and_amplification(adapters: dict[str, Any]) -> None:
    d = adapters["dir"] / "r4"
    result = json.loads(lorafx("analyze", str(d), "--model", str(TINY), "--json").stdout)
    params = {k: v.detach().double().numpy() for k, v in adapters["model"].state_dict().items()}
    weights = {"head": params["head.weight"], "w_in": params["w_in"], "w_mid": params["w_mid"],
               "w_up": params["w_up"].T}  # w_up is read as x @ W: [in, out]
    for site, w in weights.items():
        a, b, s = factors(d, site)
        delta = s * b @ a
        rep = result["sites"][site]
        np.testing.assert_allclose(rep["relative"], np.linalg.norm(delta) / np.linalg.norm(w),
                                   rtol=1e-9)
        u, _, vh = np.linalg.svd(delta)
        along = np.linalg.norm(u[:, :4].T @ w @ vh[:4].T)  # ‖Uᵀ W V‖_F, the paper's Table 7
        np.testing.assert_allclose(rep["amplification"]["delta_dirs"], along, rtol=1e-8)
        np.testing.assert_allclose(rep["amplification"]["factor"],
                                   np.linalg.norm(delta) / along, rtol=1e-8)
    text = lorafx("analyze", str(d)).stdout
    assert "eff.rank" in text and "w_mid" in text


def test_resize_reports_energy_and_truncates(adapters: dict[str, Any], tmp_path: Path) -> None:
    d = adapters["dir"]
    out = tmp_path / "r2"
    result = json.loads(lorafx("resize", str(d / "r8"), "--rank", "2", "-o", str(out),
                               "--json").stdout)
    for site in SITES:
        a, b, s = factors(d / "r8", site)
        u, sv, vh = np.linalg.svd(s * b @ a)
        np.testing.assert_allclose(result["sites"][site]["energy_kept"],
                                   np.sum(sv[:2] ** 2) / np.sum(sv ** 2), rtol=1e-9)
        a2, b2, s2 = factors(out, site)
        assert a2.shape[0] == 2
        np.testing.assert_allclose(s2 * b2 @ a2, (u[:, :2] * sv[:2]) @ vh[:2], atol=1e-5)
    again = lorafx("resize", str(d / "r8"), "--rank", "2", "-o", str(out), check=False)
    assert again.returncode == 1 and "--force" in again.stderr and not again.stdout


def test_combine_cat_is_the_exact_weighted_sum(adapters: dict[str, Any], tmp_path: Path) -> None:
    d = adapters["dir"]
    out = tmp_path / "mix"
    lorafx("combine", str(d / "r4"), str(d / "r8"), "--weights", "0.7,-0.4", "--method", "cat",
           "-o", str(out))
    for site in SITES:
        (a4, b4, s4), (a8, b8, s8) = factors(d / "r4", site), factors(d / "r8", site)
        a, b, s = factors(out, site)
        assert a.shape[0] == 12
        np.testing.assert_allclose(s * b @ a, 0.7 * s4 * b4 @ a4 - 0.4 * s8 * b8 @ a8,
                                   atol=1e-5)
    bad = lorafx("combine", str(d / "r4"), str(d / "r8"), "--weights", "1", "-o",
                 str(tmp_path / "x"), check=False)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    assert "one weight per adapter" in bad.stderr and not (tmp_path / "x").exists()
