"""The LoRA paper's rank analysis (Hu et al. 2021, section 7) of adapter directories.

For a site with factors A (r, in) and B (out, r) and scale s, the update is ΔW = s · B @ A.

- Spectrum: the singular values σ_1 >= ... >= σ_m of ΔW (m = min(r, out, in); the rest are 0),
  computed without forming ΔW: B = Q_b R_b and Aᵀ = Q_a R_a give ΔW = s · Q_b (R_b R_aᵀ) Q_aᵀ,
  so ΔW's SVD is the SVD of the small r × r core, rotated by Q_b and Q_a.
- Effective rank: the smallest k with Σ_{i<=k} σ_i² >= energy · Σ_i σ_i².
- Subspace similarity (section 7.2): with U_1, U_2 the right-singular vectors of two lora_A
  matrices as columns, φ(i, j) = ‖U_1[:, :i]ᵀ U_2[:, :j]‖²_F / min(i, j) ∈ [0, 1]: 1 when one
  top subspace contains the other, about max(i, j) / in for random subspaces.
- Amplification (section 7.3, Table 7): with U (out × r), V (in × r) the top-r left / right
  singular vectors of ΔW, ‖Uᵀ W V‖_F says how much of W lies in ΔW's directions; compared with
  W's own top-r directions and random ones, and ‖ΔW‖_F / ‖Uᵀ W V‖_F is the amplification factor.

All math runs in float64; results are plain Python floats and lists, ready for ``json.dumps``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import LoraConfig
from ..errors import LoraFxError, some
from ..fileio import atomic_path
from .peft import Adapter, read_adapter

AdapterLike = Adapter | str | os.PathLike[str]
MatrixLike = torch.Tensor | np.ndarray


def as_adapter(source: AdapterLike) -> Adapter:
    """``source`` itself when it is an :class:`Adapter`, else the adapter directory it names."""
    return source if isinstance(source, Adapter) else read_adapter(Path(source))


def _label(source: AdapterLike) -> str:
    return "<adapter in memory>" if isinstance(source, Adapter) else str(source)


def check_finite(adapter: Adapter, site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``site``'s (A, B), refused when they hold inf or NaN (an SVD of them would fail)."""
    a, b = adapter.lora[site]
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise LoraFxError(f"site {site!r} has non-finite values in lora_A or lora_B: the adapter "
                          "is corrupt (did training diverge?); retrain or restore it")
    return a, b


def factors(adapter: Adapter, site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(s·B, A) of ``site`` as 2-D float64 matrices, so that ΔW = (s·B) @ A (conv flattened)."""
    adapter.refuse_experts(site)
    a, b = check_finite(adapter, site)
    scale = adapter.config.scale_for(site)
    return scale * b.detach().double().flatten(1), a.detach().double().flatten(1)


def lowrank_svd(b: torch.Tensor, a: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, S, Vh) of M = B @ A for B (out, r), A (r, in), without forming M.

    B = Q_b R_b and Aᵀ = Q_a R_a (reduced QR) give M = Q_b (R_b R_aᵀ) Q_aᵀ; with the core's SVD
    R_b R_aᵀ = U_c S V_cᵀ, M = (Q_b U_c) S (Q_a V_c)ᵀ. Costs O((out + in) r²), not O(out·in·r).
    S holds min(out, r, in) values, descending.
    """
    q_b, r_b = torch.linalg.qr(b.double())
    q_a, r_a = torch.linalg.qr(a.double().T)
    u_c, s, vh_c = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return q_b @ u_c, s, vh_c @ q_a.T


def spectrum(adapter: Adapter, site: str) -> list[float]:
    """Singular values of ΔW = s · B @ A for ``site``, descending (the min(r, out, in) largest)."""
    if site not in adapter.lora:
        raise LoraFxError(f"site {site!r} is not in the adapter: its sites are "
                          f"{some(sorted(adapter.lora), site)}")
    _, s, _ = lowrank_svd(*factors(adapter, site))
    return [float(v) for v in s]


def effective_rank(svals: list[float] | np.ndarray, energy: float = 0.9) -> int:
    """Smallest k with Σ_{i<=k} σ_i² >= energy · Σ σ_i² (σ sorted descending); 0 when ΔW = 0."""
    if not 0.0 < energy <= 1.0:
        raise LoraFxError(f"energy={energy!r} must be in (0, 1]: it is the fraction of "
                          "Σσ² the top-k singular values must hold")
    sq = np.sort(np.abs(np.asarray(svals, dtype=np.float64)))[::-1] ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 0
    cum = np.cumsum(sq)
    # a relative slack of 1e-12 keeps exact ties (e.g. 3 of 4 equal values at 0.75) from
    # failing on the last bit of the floating-point sum
    return int(np.argmax(cum >= energy * total * (1.0 - 1e-12))) + 1


def _right_vectors(a: MatrixLike) -> torch.Tensor:
    """Right-singular vectors of A (r × in) as the columns of an (in × min(r, in)) matrix."""
    t = torch.as_tensor(a).detach().double().flatten(1)
    return torch.linalg.svd(t, full_matrices=False).Vh.T


def subspace_similarity(a1: MatrixLike, a2: MatrixLike) -> np.ndarray:
    """φ(i, j) = ‖U_1[:, :i]ᵀ U_2[:, :j]‖²_F / min(i, j) at entry [i-1, j-1].

    U_k are the right-singular vectors of lora_A matrix A_k (r_k × in), ordered by singular
    value. With G = U_1ᵀ U_2, the numerator is the 2-D prefix sum of G² up to (i, j). The
    result has shape (min(r1, in), min(r2, in)) and values in [0, 1].
    """
    u1, u2 = _right_vectors(a1), _right_vectors(a2)
    if u1.shape[0] != u2.shape[0]:
        raise LoraFxError(f"lora_A matrices have {u1.shape[0]} and {u2.shape[0]} input features: "
                          "subspace similarity needs adapters of the same layer")
    prefix = (u1.T @ u2).square().cumsum(0).cumsum(1)
    i = torch.arange(1, prefix.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, prefix.shape[1] + 1, dtype=torch.float64)[None, :]
    return (prefix / torch.minimum(i, j)).clamp(0.0, 1.0).numpy()


def random_baseline(r1: int, r2: int, dim: int, seed: int = 0) -> np.ndarray:
    """φ for two random Gaussian matrices (r1 × dim) and (r2 × dim): the paper's baseline."""
    gen = torch.Generator().manual_seed(seed)
    g1 = torch.randn(r1, dim, generator=gen, dtype=torch.float64)
    g2 = torch.randn(r2, dim, generator=gen, dtype=torch.float64)
    return subspace_similarity(g1, g2)


def _random_frame(rows: int, r: int, gen: torch.Generator) -> torch.Tensor:
    """A random (rows × r) matrix with orthonormal columns (QR of a Gaussian)."""
    q, _ = torch.linalg.qr(torch.randn(rows, r, generator=gen, dtype=torch.float64))
    return q


def _amplification(u: torch.Tensor, v: torch.Tensor, delta_fro: float, weight: torch.Tensor,
                   seed: int) -> dict[str, Any]:
    """Table 7 given ΔW's top-r singular vectors u (out × r), v (in × r) and ‖ΔW‖_F."""
    w = weight.detach().double()
    r = u.shape[1]
    gen = torch.Generator().manual_seed(seed)
    u_rand, v_rand = _random_frame(w.shape[0], r, gen), _random_frame(w.shape[1], r, gen)
    w_svals = torch.linalg.svdvals(w)
    delta_dirs = float(torch.linalg.norm(u.T @ w @ v))
    return {
        "r": r,
        "delta_dirs": delta_dirs,
        "weight_dirs": float(w_svals[:r].square().sum().sqrt()),  # = ‖U_Wᵀ W V_W‖_F
        "random_dirs": float(torch.linalg.norm(u_rand.T @ w @ v_rand)),
        "delta_fro": delta_fro,
        "weight_fro": float(torch.linalg.norm(w)),
        "factor": delta_fro / delta_dirs if delta_dirs > 0.0 else None,
    }


def amplification(delta: torch.Tensor, weight: torch.Tensor, r: int,
                  seed: int = 0) -> dict[str, Any]:
    """The paper's Table 7 for one weight W (out × in) and its update ΔW (out × in).

    With U (out × r), V (in × r) the top-r left / right singular vectors of ΔW:
    ``delta_dirs`` = ‖Uᵀ W V‖_F, ``weight_dirs`` = the same with W's own top-r singular
    vectors (= sqrt(Σ_{i<=r} σ_i(W)²), the largest possible), ``random_dirs`` = the same with
    random orthonormal U, V (seeded), ``factor`` = ‖ΔW‖_F / ‖Uᵀ W V‖_F (None when that is 0),
    plus ``delta_fro`` = ‖ΔW‖_F and ``weight_fro`` = ‖W‖_F.
    """
    d = delta.detach().double().flatten(1)
    if d.shape != weight.flatten(1).shape:
        raise LoraFxError(f"ΔW has shape {tuple(d.shape)} but W has {tuple(weight.shape)}: pass "
                          "the weight of the layer the adapter was trained on")
    if not 1 <= r <= min(d.shape):
        raise LoraFxError(f"r={r} must be between 1 and {min(d.shape)} for a {tuple(d.shape)} "
                          "weight")
    u, _, vh = torch.linalg.svd(d, full_matrices=False)
    return _amplification(u[:, :r], vh[:r].T, float(torch.linalg.norm(d)), weight.flatten(1),
                          seed)


def _weight_for(weights: dict[str, torch.Tensor], site: str, config: LoraConfig,
                shape: tuple[int, int]) -> torch.Tensor:
    """W of ``site`` from a state dict, as (out, in): Conv1D (fan_in_fan_out) is transposed."""
    w = weights.get(site + ".weight", weights.get(site))
    if w is None:
        raise LoraFxError(f"weights have no tensor for site {site!r} (looked for "
                          f"'{site}.weight' and '{site}'): pass the base model's state dict")
    w = w.detach().flatten(1)
    if config.fan_in_fan_out:
        w = w.T
    if tuple(w.shape) != shape:
        raise LoraFxError(f"weight of site {site!r} has shape {tuple(w.shape)} but the adapter's "
                          f"ΔW has {shape}: pass the base model the adapter was trained on")
    return w


def _site_report(adapter: Adapter, site: str, weights: dict[str, torch.Tensor] | None,
                 energy: float) -> dict[str, Any]:
    """Spectrum, effective rank, ‖ΔW‖_F and, with ``weights``, Table 7 for one site."""
    b, a = factors(adapter, site)
    u, s, vh = lowrank_svd(b, a)
    svals = [float(v) for v in s]
    fro = math.sqrt(sum(v * v for v in svals))
    out: dict[str, Any] = {"rank": int(a.shape[0]), "scale": adapter.config.scale_for(site),
                           "singular_values": svals,
                           "effective_rank": effective_rank(svals, energy), "delta_fro": fro}
    if weights is not None:
        w = _weight_for(weights, site, adapter.config, (b.shape[0], a.shape[1]))
        amp = _amplification(u, vh.T, fro, w, seed=0)
        out["weight_fro"] = amp["weight_fro"]
        out["relative"] = fro / amp["weight_fro"] if amp["weight_fro"] > 0.0 else None
        out["amplification"] = amp
    return out


def _similarities(first: Adapter, second: Adapter, names: tuple[str, str]
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """φ(A_1, A_2) and the random baseline of the same shape, per shared site."""
    shared = sorted(set(first.lora) & set(second.lora))
    if not shared:
        raise LoraFxError(f"adapters {names[0]} and {names[1]} share no site: subspace "
                          "similarity compares adapters trained on the same layers")
    sim: dict[str, Any] = {}
    base: dict[str, Any] = {}
    for index, site in enumerate(shared):
        a1, a2 = first.lora[site][0], second.lora[site][0]
        if a1.flatten(1).shape[1] != a2.flatten(1).shape[1]:
            raise LoraFxError(f"site {site!r} has lora_A {tuple(a1.shape)} in {names[0]} but "
                              f"{tuple(a2.shape)} in {names[1]}: the adapters are for "
                              "different models")
        phi = subspace_similarity(a1, a2)
        sim[site] = phi.tolist()
        base[site] = random_baseline(phi.shape[0], phi.shape[1], a1.flatten(1).shape[1],
                                     seed=index).tolist()
    return sim, base


def analyze(first: AdapterLike, second: AdapterLike | None = None,
            weights: dict[str, torch.Tensor] | None = None, energy: float = 0.9) -> dict[str, Any]:
    """The rank analysis of one adapter, or of two with their subspace similarity.

    ``first`` / ``second``: adapter directories (or :class:`Adapter` objects). ``weights``: the
    base model's state dict (keys ``<site>.weight`` or ``<site>``), for ‖W‖_F and Table 7.
    Returns JSON-ready data::

        {"adapters": [name1, (name2)], "energy": 0.9,
         "sites": {site: {"rank", "scale", "singular_values", "effective_rank", "delta_fro",
                          ("weight_fro", "relative", "amplification")}},
         # with two adapters:
         "sites2": {...the same for the second...},
         "similarity": {site: [[φ(i, j) for j in 1..r2] for i in 1..r1]},
         "baseline": {site: [[φ of random Gaussian matrices of the same shapes]]}}
    """
    one = as_adapter(first)
    result: dict[str, Any] = {
        "adapters": [_label(first)], "energy": energy,
        "sites": {site: _site_report(one, site, weights, energy) for site in sorted(one.lora)},
    }
    if second is None:
        return result
    two = as_adapter(second)
    result["adapters"].append(_label(second))
    result["sites2"] = {site: _site_report(two, site, weights, energy) for site in sorted(two.lora)}
    result["similarity"], result["baseline"] = _similarities(
        one, two, (_label(first), _label(second)))
    return result


def _natural(name: str) -> list[Any]:
    """Sort key that puts layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _pick(names: list[str], limit: int) -> list[str]:
    """At most ``limit`` of ``names``, evenly spread (first and last layer included)."""
    if len(names) <= limit:
        return names
    idx = np.linspace(0, len(names) - 1, limit).round().astype(int)
    return [names[i] for i in sorted(set(idx.tolist()))]


def _plot_similarity(fig: Any, result: dict[str, Any], max_sites: int) -> None:
    """Heatmaps of φ(i, j), i down the y axis and j along x, as in the paper's Figures 3-4."""
    sites = _pick(sorted(result["similarity"], key=_natural), max_sites)
    cols = min(4, len(sites))
    rows = math.ceil(len(sites) / cols)
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for ax, site in zip(axes.flat, sites, strict=False):
        phi = np.asarray(result["similarity"][site])
        image = ax.imshow(phi, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto",
                          extent=(0.5, phi.shape[1] + 0.5, phi.shape[0] + 0.5, 0.5))
        ax.set_title(site, fontsize=8)
        ax.set_xlabel("j", fontsize=8)
        ax.set_ylabel("i", fontsize=8)
    for ax in list(axes.flat)[len(sites):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="φ(i, j)")
    names = result.get("adapters", ["A1", "A2"])
    shown = f" ({len(sites)} of {len(result['similarity'])} sites)" if len(
        sites) < len(result["similarity"]) else ""
    fig.suptitle(f"subspace similarity of lora_A: {names[0]} vs {names[-1]}{shown}", fontsize=9)


def _plot_spectra(fig: Any, result: dict[str, Any], max_sites: int) -> None:
    """σ_i / σ_1 per site (log scale) and each site's effective rank."""
    sites = sorted(result["sites"], key=_natural)
    spec_ax, rank_ax = fig.subplots(1, 2)
    for site in _pick(sites, max_sites):
        svals = np.asarray(result["sites"][site]["singular_values"])
        if svals.size and svals[0] > 0:
            spec_ax.semilogy(np.arange(1, svals.size + 1), svals / svals[0], marker=".",
                             label=site)
    spec_ax.set_xlabel("i")
    spec_ax.set_ylabel("σ_i / σ_1 of ΔW")
    if len(sites) <= max_sites:
        spec_ax.legend(fontsize=6)
    ranks = [result["sites"][s]["effective_rank"] for s in sites]
    rank_ax.bar(np.arange(len(sites)), ranks)
    if len(sites) <= 24:
        rank_ax.set_xticks(np.arange(len(sites)), sites, rotation=60, ha="right", fontsize=6)
    else:
        rank_ax.set_xlabel("site (sorted by name)")
    rank_ax.set_ylabel(f"effective rank ({result.get('energy', 0.9):g} of Σσ²)")
    fig.suptitle(f"spectrum of ΔW: {result.get('adapters', ['adapter'])[0]}", fontsize=9)


def plot(result: dict[str, Any], path: str | os.PathLike[str], max_sites: int = 8) -> Path:
    """Draw ``analyze``'s result as a PNG at ``path`` (written atomically) and return the path.

    With two adapters: φ heatmaps for up to ``max_sites`` sites spread over the model; with
    one: the normalized singular value spectra and the effective rank of every site.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError as err:
        raise LoraFxError("plotting needs matplotlib: pip install 'lorafx[plot]'") from err
    if not result.get("sites"):
        raise LoraFxError("the analysis holds no site: nothing to plot")
    two = bool(result.get("similarity"))
    n = min(max_sites, len(result["similarity"])) if two else 0
    size = (3.2 * min(4, n) + 1.2, 2.8 * math.ceil(n / 4) + 0.6) if two else (11.0, 4.0)
    fig = Figure(figsize=size, layout="constrained")
    (_plot_similarity if two else _plot_spectra)(fig, result, max_sites)
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return target
