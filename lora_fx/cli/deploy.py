"""``lorafx convert-adapter`` and ``lorafx run``: deploy adapters on ONNX Runtime.

The library is imported inside the commands so that ``lorafx --help`` stays fast.

Input specs for ``run --inputs NAME=SPEC`` (shell-friendly):
``rand:2x8`` random of the input's dtype (ints in [0, 2), floats N(0, 1)), ``rand:2x8:97`` ints
in [0, 97); ``ints:``/``floats:`` are aliases of ``rand:``; ``ones:2x8``, ``zeros:2x8``; a
``.npy`` file; or a JSON literal such as ``[[1,2,3]]``. Inputs not given are ``rand`` with every
symbolic axis set to ``--dim``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import click
import numpy as np

from ..deploy_format import IDS_INPUT
from ..errors import LoraFxError, some
from ..fileio import check_output_file
from ..ort import runtime
from ..ort.adapter_sets import convert_set, named_dirs
from ..ort.adapters import convert_adapter as convert
from ..ort.serving import AdapterSession

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
             "tensor(double)": np.float64, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
             "tensor(bool)": np.bool_, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}


@click.command("convert-adapter")
@click.argument("directories", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(),
              help="The .onnx_adapter file to write.")
@click.option("--model", "model", type=click.Path(),
              help="Unmerged .onnx (lorafx export --no-merge): check names and dims, take its "
                   "dtype, give sites the adapter lacks zero factors.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="Parameter dtype (default: the model's, else fp32).")
@click.option("--no-fill", is_flag=True, help="Refuse when the model has sites the adapter "
                                              "lacks, instead of filling zeros.")
@click.option("--mixed-batch", is_flag=True,
              help="Stack the DIRECTORIES ([NAME=]DIR, id k = k-th) into one set for a "
                   "--mixed-batch model; writes OUTPUT's NAME.adapter_ids.json.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
def convert_adapter_command(directories: tuple[str, ...], output: str, model: str | None,
                            dtype: str | None, no_fill: bool, mixed_batch: bool, force: bool,
                            as_json: bool) -> None:
    """Write ONNX Runtime's adapter file from a lorafx or PEFT adapter DIRECTORY.

    Parameters are <site>.lora_A.weight = Aᵀ (in, r) and <site>.lora_B.weight = s·Bᵀ (r, out),
    the inputs of `lorafx export --no-merge`; use with onnxruntime.LoraAdapter and
    RunOptions.add_active_adapter, or `lorafx run MODEL.onnx --adapter FILE`. With
    --mixed-batch, several DIRECTORIES become one set: [n+1, in, r_max] / [n+1, r_max, out].
    """

    check_output_file(output, force)  # before any work
    if mixed_batch:
        _convert_set(directories, output, model, dtype, force, as_json)
        return
    if len(directories) != 1:
        raise LoraFxError(f"{len(directories)} adapter directories given: convert one at a "
                          "time, or stack them with --mixed-batch")
    directory = directories[0]
    report = convert(directory, output, model=model, dtype=dtype, force=force,
                     fill_missing=not no_fill)
    data: dict[str, Any] = {
        "output": str(report.path), "dtype": report.dtype, "sites": report.sites,
        "filled_with_zeros": report.filled, "bytes": report.bytes, "checked_against": model}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    ranks = sorted(set(report.sites.values()))
    click.echo(f"wrote {report.path} ({len(report.sites)} sites, rank "
               f"{'/'.join(map(str, ranks))}, {report.dtype}, {report.bytes / 1e3:.1f} kB)")
    if model:
        click.echo(f"names and shapes match {model}"
                   + (f"; {len(report.filled)} sites the adapter lacks set to zero"
                      if report.filled else ""))


def _convert_set(directories: tuple[str, ...], output: str, model: str | None,
                 dtype: str | None, force: bool, as_json: bool) -> None:
    report = convert_set(named_dirs(directories), output, model=model, dtype=dtype, force=force)
    data: dict[str, Any] = {
        "output": str(report.path), "ids_file": str(report.ids_path), "dtype": report.dtype,
        "adapters": {n: k for k, n in enumerate(report.names)}, "sites": report.sites,
        "filled_with_zeros": report.filled, "bytes": report.bytes, "checked_against": model}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    ids = ", ".join(f"{k}={n}" for n, k in data["adapters"].items())
    click.echo(f"wrote {report.path} (set of {len(report.names) - 1}: {ids}; "
               f"{len(report.sites)} sites, {report.dtype}, {report.bytes / 1e3:.1f} kB) and "
               f"{report.ids_path}")


def parse_spec(spec: str, type_name: str, shape: list[Any], dim: int,
               rng: np.random.Generator) -> np.ndarray:
    """One input from its SPEC (see the module docstring) and the model's declared type."""
    np_type = _NP_TYPES.get(type_name)
    if np_type is None:
        raise LoraFxError(f"input type {type_name} is not supported by `lorafx run`")
    kind, _, rest = spec.partition(":")
    if kind in ("rand", "ints", "floats", "ones", "zeros") and rest:
        dims_text, _, high = rest.partition(":")
        try:
            dims = [int(d) for d in dims_text.lower().split("x")]
            top = int(high) if high else 2
        except ValueError as err:
            raise LoraFxError(f"input spec {spec!r}: shape must look like 2x8 (and an optional "
                              ":HIGH integer)") from err
        if kind in ("ones", "zeros"):
            return (np.ones if kind == "ones" else np.zeros)(dims, dtype=np_type)
        if np.issubdtype(np_type, np.floating):
            return rng.standard_normal(dims).astype(np_type)
        return rng.integers(0, top, dims).astype(np_type)
    if spec.endswith(".npy"):
        if not Path(spec).is_file():
            raise LoraFxError(f"input file {spec} does not exist")
        return np.load(spec, allow_pickle=False).astype(np_type)
    try:
        return np.asarray(json.loads(spec), dtype=np_type)
    except (json.JSONDecodeError, ValueError, TypeError) as err:
        raise LoraFxError(f"input spec {spec!r} is not rand:2x8, ones:2x8, zeros:2x8, a .npy "
                          "file or a JSON list") from err


def _default_spec(shape: list[Any], dim: int, sizes: dict[str, int]) -> str:
    dims = [d if isinstance(d, int) and d > 0 else sizes.get(str(d), dim) for d in shape]
    return "rand:" + "x".join(map(str, dims)) if dims else "rand:1"


def build_inputs(session: Any, specs: tuple[str, ...], dim: int,
                 seed: int) -> dict[str, np.ndarray]:
    """Every model input, from ``NAME=SPEC`` items or random: a symbolic axis takes the size
    it has in a given input (attention_mask follows input_ids), else ``dim``."""
    declared = {i.name: i for i in session.get_inputs()}
    given: dict[str, str] = {}
    for item in specs:
        name, sep, spec = item.partition("=")
        if not sep or name not in declared:
            raise LoraFxError(f"--inputs {item!r}: use NAME=SPEC with NAME one of "
                              f"{some(declared, name)}")
        given[name] = spec
    rng = np.random.default_rng(seed)
    out = {name: parse_spec(spec, declared[name].type, list(declared[name].shape), dim, rng)
           for name, spec in given.items()}
    sizes = {axis: int(size) for name, arr in out.items()  # a wrong rank is ORT's to refuse
             for axis, size in zip(declared[name].shape, arr.shape, strict=False)
             if isinstance(axis, str)}
    for name, info in declared.items():
        if name not in out:
            spec = _default_spec(list(info.shape), dim, sizes)
            out[name] = parse_spec(spec, info.type, list(info.shape), dim, rng)
    return {name: out[name] for name in declared}


def _summary(name: str, arr: np.ndarray) -> dict[str, Any]:
    flat = arr.astype(np.float64).ravel()
    return {"name": name, "shape": list(arr.shape), "dtype": str(arr.dtype),
            "mean": float(flat.mean()) if flat.size else None,
            "min": float(flat.min()) if flat.size else None,
            "max": float(flat.max()) if flat.size else None,
            "head": [round(float(v), 6) for v in flat[:6]]}


def _millis(times: list[float]) -> dict[str, float]:
    ms = sorted(t * 1e3 for t in times)
    return {"median": round(statistics.median(ms), 4), "min": round(ms[0], 4),
            "max": round(ms[-1], 4), "repeat": len(ms)}


_PROVIDERS = {"auto": None, "cpu": ["CPUExecutionProvider"],
              "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


@click.command("run")
@click.argument("model", type=click.Path())
@click.option("--adapter", "adapters", multiple=True, type=click.Path(),
              help="An .onnx_adapter file (repeatable: one run per adapter, one session).")
@click.option("-i", "--inputs", "specs", multiple=True,
              help="NAME=SPEC: rand:2x8[:HIGH], ones:2x8, zeros:2x8, file.npy or a JSON list.")
@click.option("--provider", type=click.Choice(list(_PROVIDERS)), default="auto",
              show_default=True, help="auto: CUDA when present, else CPU.")
@click.option("--adapter-ids", "adapter_ids", default=None,
              help="A mixed-batch model's adapter per batch row, comma-separated names or ids "
                   "(e.g. __base__,a1,a2,a1); default: row i uses id i mod (n+1).")
@click.option("--bind", is_flag=True, help="Run through I/O binding (the GPU serving path).")
@click.option("--no-base", is_flag=True, help="With --adapter: skip the run without adapter.")
@click.option("--repeat", type=int, default=10, show_default=True, help="Timed runs.")
@click.option("--warmup", type=int, default=2, show_default=True)
@click.option("--dim", type=int, default=4, show_default=True,
              help="Size of a symbolic axis of inputs not given (unless a given input "
                   "has that axis: then its size).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
def run_command(model: str, adapters: tuple[str, ...], specs: tuple[str, ...], provider: str,
        adapter_ids: str | None, bind: bool, no_base: bool, repeat: int, warmup: int, dim: int,
        seed: int, threads: int | None, as_json: bool) -> None:
    """Run an ONNX MODEL on ONNX Runtime: outputs, provider and latency.

    With --adapter FILE (an unmerged export's adapter), each adapter runs in the same session
    through RunOptions.add_active_adapter (or bound by lorafx with --bind); the first run has
    no adapter active (the exported defaults) unless --no-base. A --mixed-batch model takes
    an adapter per row (--adapter-ids); its --adapter files are sets (convert-adapter
    --mixed-batch), whose names --adapter-ids uses.
    """

    if repeat < 1 or warmup < 0:
        raise LoraFxError("--repeat must be >= 1 and --warmup >= 0")
    if provider == "cuda":
        runtime.require_cuda()
    sess = AdapterSession(model, _PROVIDERS[provider], threads)
    if provider == "cuda" and sess.provider != runtime.CUDA:
        raise LoraFxError(f"--provider cuda: ONNX Runtime could not start CUDA for {model} and "
                          f"fell back to {sess.provider} (CUDA/cuDNN libraries missing?)")
    names: list[str | None] = [] if adapters and no_base else [None]
    for path in adapters:
        sess.load(Path(path).stem, path)
        names.append(Path(path).stem)
    feeds = build_inputs(sess.session, specs, dim, seed)
    rows = _rows(sess, feeds, specs, adapter_ids)
    runs: list[dict[str, Any]] = []
    for name in names:
        run_rows = _default_rows(sess, feeds, name) if sess.mixed and rows is None and \
            IDS_INPUT not in feeds else rows
        run_feeds = sess.with_rows(feeds, run_rows, name)  # checked before ONNX Runtime runs
        outputs = sess.run_bound(run_feeds, name) if bind else sess.run(run_feeds, name)
        times = sess.latency(run_feeds, name, repeat, warmup, bound=bind)
        runs.append({"adapter": name, "latency_ms": _millis(times),
                     **({"adapter_ids": run_feeds[IDS_INPUT].tolist()} if sess.mixed else {}),
                     "outputs": [_summary(n, np.asarray(o))
                                 for n, o in zip(sess.outputs, outputs, strict=True)]})
    data: dict[str, Any] = {"model": model, "provider": sess.provider, "providers": sess.providers,
            "io_binding": bind, "inputs": {k: list(v.shape) for k, v in feeds.items()},
            "runs": runs}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    shapes = ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in feeds.items())
    click.echo(f"{model} on {sess.provider}{' (I/O binding)' if bind else ''}; inputs: {shapes}")
    for item in runs:
        lat = item["latency_ms"]
        ids = f"  adapter_ids: {item['adapter_ids']}" if "adapter_ids" in item else ""
        click.echo(f"\nadapter: {item['adapter'] or 'none (exported defaults)'}{ids}  latency: "
                   f"median {lat['median']:.3f} ms (min {lat['min']:.3f}, max {lat['max']:.3f}, "
                   f"{lat['repeat']} runs)")
        for out in item["outputs"]:
            head = ", ".join(f"{v:.4g}" for v in out["head"])
            click.echo(f"  {out['name']} {out['dtype']} {'x'.join(map(str, out['shape']))}: "
                       f"mean {out['mean']:.4g} min {out['min']:.4g} max {out['max']:.4g} "
                       f"[{head}, ...]")


def _rows(sess: AdapterSession, feeds: dict[str, np.ndarray], specs: tuple[str, ...],
          adapter_ids: str | None) -> list[str] | None:
    """--adapter-ids as a list; for a mixed-batch model, drops the random ``adapter_ids``
    that ``build_inputs`` made unless ``-i adapter_ids=...`` gave it."""
    if sess.mixed and not any(s.startswith(IDS_INPUT + "=") for s in specs):
        feeds.pop(IDS_INPUT, None)
    if adapter_ids is None:
        return None
    if not sess.mixed:
        raise LoraFxError(f"--adapter-ids: {sess.path} takes one adapter per run: export it "
                          "with --mixed-batch, or use --adapter FILE")
    if IDS_INPUT in feeds:
        raise LoraFxError(f"give the rows' adapters once: --adapter-ids or -i {IDS_INPUT}=...")
    return [item.strip() for item in adapter_ids.split(",")]


def _default_rows(sess: AdapterSession, feeds: dict[str, np.ndarray],
                  adapter: str | None) -> list[int]:
    """Row i on id i mod (n + 1) of the active set."""
    loaded = sess.adapters.get(adapter) if adapter else None
    count = loaded.count if loaded else len(sess.rows or ()) or 1
    batch = next((int(v.shape[0]) for v in feeds.values() if v.ndim), 1)
    return [i % count for i in range(batch)]
