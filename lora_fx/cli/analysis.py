"""``lorafx analyze``, ``lorafx resize`` and ``lorafx combine``: thin click layers over
:mod:`lora_fx.adapter.analysis` and :mod:`lora_fx.adapter.surgery`.

The library is imported inside each command so that ``lorafx --help`` stays fast.
"""

from __future__ import annotations

from typing import Any

import click
import numpy as np

from ..adapter.analysis import analyze as run_analysis
from ..adapter.analysis import plot
from ..adapter.peft import check_adapter_output, read_adapter, write_adapter
from ..adapter.surgery import combine as run_combine
from ..adapter.surgery import resize as run_resize
from ..capture.trace import capture
from ..errors import LoraFxError
from ..load.model import load_model
from ..match.matcher import find_sites
from .common import echo_json, table


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _read(directory: str, what: str) -> Any:
    """The adapter in ``directory``; DoRA adapters are refused where ``what`` cannot keep m."""

    adapter = read_adapter(directory)
    if what and getattr(adapter, "magnitude", None):
        raise LoraFxError(f"{directory} is a DoRA adapter (lora_magnitude_vector): {what} works "
                          "on plain LoRA adapters only; merge it into the model instead")
    return adapter


def base_weights(spec: str, sites: set[str], fan_in_fan_out: bool) -> dict[str, Any]:
    """Each site's base weight from MODEL ``spec``, laid out as the adapter's config expects:
    W [out, in], or Wᵀ [in, out] when the adapter says ``fan_in_fan_out`` (HF Conv1D)."""

    loaded = load_model(spec)
    gm = capture(loaded.module, loaded.example_inputs, loaded.dynamic_shapes)
    found, _ = find_sites(gm)
    weights: dict[str, Any] = {}
    for site in found:
        w = gm.get_parameter(site.weight).detach()
        w_out_in = w.T if site.layout == "in_out" else w
        weights[site.name] = w_out_in.T if fan_in_fan_out else w_out_in
    missing = sorted(sites - set(weights))
    if missing:
        raise LoraFxError(f"site {missing[0]!r} of the adapter is not a LoRA site of MODEL "
                          f"{spec}: pass the model the adapter was trained on")
    return weights


def _spectra_rows(sites: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, rep in sites.items():
        svals = rep["singular_values"]
        amp = rep.get("amplification") or {}
        rows.append([name, str(rep["rank"]), str(rep["effective_rank"]),
                     _fmt(svals[0] if svals else 0.0), _fmt(rep["delta_fro"]),
                     _fmt(rep.get("relative")), _fmt(amp.get("factor"))])
    return rows


def _similarity_rows(result: dict[str, Any]) -> list[list[str]]:

    rows = []
    for name, phi_list in result["similarity"].items():
        phi = np.asarray(phi_list)
        k = min(phi.shape)
        base = np.asarray(result["baseline"][name])
        rows.append([name, f"{phi.shape[0]}x{phi.shape[1]}", _fmt(phi[0, 0]),
                     _fmt(phi[k - 1, k - 1]), _fmt(float(phi.mean())), _fmt(float(base.mean()))])
    return rows


def _print_analysis(result: dict[str, Any]) -> None:
    header = ["site", "r", "eff.rank", "sigma_1", "|dW|_F", "|dW|/|W|", "amplif."]
    for index, key in enumerate(("sites", "sites2")):
        if key in result:
            click.echo(f"{result['adapters'][index]}: spectrum of dW = s*B@A (effective rank: "
                       f"{result['energy']:g} of the energy)")
            click.echo(table(header, _spectra_rows(result[key])) + "\n")
    if "similarity" in result:
        click.echo("subspace similarity phi(i, j) of the lora_A right-singular vectors "
                   "(random baseline: mean phi of Gaussian matrices of the same shapes)")
        click.echo(table(["site", "r1xr2", "phi(1,1)", "phi(k,k)", "mean phi", "random"],
                          _similarity_rows(result)))


@click.command("analyze")
@click.argument("adapter_dir", type=click.Path())
@click.argument("second_dir", required=False, type=click.Path())
@click.option("--model", "model_spec", default=None,
              help="MODEL the adapters were trained on: adds |dW|/|W| and the amplification "
                   "analysis (the paper's Table 7).")
@click.option("--energy", type=float, default=0.9, show_default=True,
              help="Energy fraction that defines the effective rank.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
@click.option("--plot", "plot_path", type=click.Path(), default=None,
              help="Write a PNG: phi heatmaps (two adapters) or spectra (one).")
def analyze_command(adapter_dir: str, second_dir: str | None, model_spec: str | None, energy: float,
            as_json: bool, plot_path: str | None) -> None:
    """The LoRA paper's rank analysis of ADAPTER_DIR (and of SECOND_DIR against it).

    One adapter: per site the singular values of dW = s*B@A and its effective rank. Two
    adapters: the normalized subspace similarity phi(i, j) = |U1[:, :i]^T U2[:, :j]|_F^2 /
    min(i, j) of the right-singular vectors of their lora_A, per shared site.
    """

    first = _read(adapter_dir, "")
    second = _read(second_dir, "") if second_dir else None
    weights = None
    if model_spec:
        flags = {first.config.fan_in_fan_out} | ({second.config.fan_in_fan_out} if second
                                                 else set())
        if len(flags) > 1:
            raise LoraFxError("the two adapters disagree on fan_in_fan_out: analyze them with "
                              "--model one at a time")
        sites = set(first.lora) | (set(second.lora) if second else set())
        weights = base_weights(model_spec, sites, first.config.fan_in_fan_out)
    result = run_analysis(first, second, weights=weights, energy=energy)
    result["adapters"] = [adapter_dir] + ([second_dir] if second_dir else [])
    if plot_path:
        plot(result, plot_path)
    if as_json:
        echo_json(result)
        return
    _print_analysis(result)
    if plot_path:
        click.echo(f"\nplot written to {plot_path}")


@click.command("resize")
@click.argument("adapter_dir", type=click.Path())
@click.option("-r", "--rank", "rank", type=int, required=True, help="Rank K to keep per site.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Adapter dir to write.")
@click.option("--force", is_flag=True, help="Overwrite an existing adapter.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
def resize_command(adapter_dir: str, rank: int, output: str, force: bool, as_json: bool) -> None:
    """Truncate every site's dW of ADAPTER_DIR to rank K by SVD (the best rank-K approximation)
    and write it to -o OUT, reporting the energy kept sum_{i<=K} s_i^2 / sum_i s_i^2 per site."""

    check_adapter_output(output, force)  # before any work
    adapter = _read(adapter_dir, "resize")
    new, kept = run_resize(adapter, rank)
    write_adapter(new, output, force=force)
    sites = {s: {"rank_before": int(adapter.lora[s][0].shape[0]),
                 "rank_after": int(new.lora[s][0].shape[0]), "energy_kept": kept[s]}
             for s in sorted(kept)}
    if as_json:
        echo_json({"output": output, "rank": rank, "sites": sites})
        return
    click.echo(table(["site", "r", "->", "energy kept"],
                      [[s, str(v["rank_before"]), str(v["rank_after"]),
                        f"{100 * v['energy_kept']:.2f}%"] for s, v in sites.items()]))
    click.echo(f"resized adapter written to {output}")


def _weights(text: str, count: int) -> list[float]:
    try:
        values = [float(w) for w in text.split(",") if w.strip()]
    except ValueError as err:
        raise LoraFxError(f"--weights {text!r} must be numbers separated by commas, e.g. "
                          "0.5,0.5") from err
    if len(values) != count:
        raise LoraFxError(f"--weights has {len(values)} values for {count} adapters: pass one "
                          "weight per adapter")
    return values


@click.command("combine")
@click.argument("adapter_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--weights", "weights_text", required=True,
              help="One weight per adapter, comma-separated (e.g. 0.7,0.3; may be negative).")
@click.option("--method", type=click.Choice(["svd", "linear", "cat"]), default="svd",
              show_default=True, help="PEFT's add_weighted_adapter combination type.")
@click.option("-r", "--rank", "rank", type=int, default=None,
              help="Rank of the result for --method svd (default: the largest input rank).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Adapter dir to write.")
@click.option("--force", is_flag=True, help="Overwrite an existing adapter.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
def combine_command(adapter_dirs: tuple[str, ...], weights_text: str, method: str, rank: int | None,
            output: str, force: bool, as_json: bool) -> None:
    """Combine ADAPTER_DIRS into one adapter with weights w_i: dW = sum_i w_i dW_i (svd: then
    truncated to --rank; cat: exact; linear: PEFT's cheap approximation)."""

    check_adapter_output(output, force)  # before any work
    weights = _weights(weights_text, len(adapter_dirs))
    adapters = [_read(d, "combine") for d in adapter_dirs]
    new = run_combine(adapters, weights, method=method, rank=rank)
    write_adapter(new, output, force=force)
    sites = {s: int(a.shape[0]) for s, (a, _) in sorted(new.lora.items())}
    if as_json:
        echo_json({"output": output, "method": method, "weights": weights, "ranks": sites})
        return
    click.echo(table(["site", "r"], [[s, str(r)] for s, r in sites.items()]))
    click.echo(f"combined adapter ({method}) written to {output}")
