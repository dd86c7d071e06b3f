"""Serve many adapters from one ONNX Runtime session over an unmerged export.

The model computes y + (x A')B' at each site, with A', B' overridable initializers (defaults:
the exported adapter). Per call, :meth:`AdapterSession.run` activates one loaded
``onnxruntime.LoraAdapter`` through ``RunOptions.add_active_adapter`` (ONNX Runtime feeds its
parameters by name); no adapter runs the defaults. ONNX Runtime ignores active adapters under
I/O binding, so :meth:`AdapterSession.run_bound` binds the adapter's parameters itself, from
copies placed once on the session's device (for GPU serving: no host→device copy per call).

Pitfall this class avoids: ``RunOptions.add_active_adapter`` does not keep its
``onnxruntime.LoraAdapter`` alive; once Python collects the adapter, runs silently use the
defaults. Each loaded adapter's handle lives as long as the session holds it.

Typical use::

    sess = AdapterSession("model.onnx")          # CUDA if present, else CPU
    sess.load("support", "support.onnx_adapter")
    sess.load("legal", "legal.onnx_adapter")     # any rank
    logits, = sess.run({"input_ids": ids}, adapter="legal")

A mixed-batch model (``lorafx export --mixed-batch``) takes an adapter per batch row: ``rows``
names them (or gives ids), checked against the set's order (``model.adapter_ids.json``, or the
loaded set file's) before ONNX Runtime runs::

    sess = AdapterSession("mixed.onnx")
    logits, = sess.run({"input_ids": ids}, rows=["__base__", "a1", "a2", "a1"])
    sess.load("night", "night.onnx_adapter")     # a set: lorafx convert-adapter --mixed-batch
    logits, = sess.run({"input_ids": ids}, adapter="night", rows=["n3", "__base__", ...])
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..deploy_format import A_SUFFIX, B_SUFFIX, IDS_INPUT, NAMES_META, read_ids
from ..errors import LoraFxError, some
from . import runtime
from .adapter_sets import check_ids, row_ids

Inputs = Mapping[str, Any] | Sequence[Any]


@dataclass
class LoadedAdapter:
    """A loaded adapter: ONNX Runtime's handle, and its parameters on the session's device."""

    name: str
    path: Path
    handle: Any                     # onnxruntime.LoraAdapter
    run_options: Any                # RunOptions with this adapter active
    bound: dict[str, Any]           # parameter name → OrtValue on the session's device
    ranks: dict[str, int]           # site → rank
    rows: list[str] | None = None   # a mixed-batch set: names by id ("__base__" first)
    count: int = 0                  # a mixed-batch set: n + 1 ids


class AdapterSession:
    """One ``onnxruntime.InferenceSession`` over an unmerged export, many adapters."""

    def __init__(self, model: str | Path, providers: Sequence[Any] | None = None,
                 threads: int | None = None) -> None:
        self.path = Path(model)
        self.session = runtime.open_session(self.path, providers, threads)
        self.provider = runtime.session_provider(self.session)
        self.providers: list[str] = list(self.session.get_providers())
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        # numpy has no bfloat16: such outputs come back through I/O binding, as float32
        self.bf16_outputs = any(o.type == "tensor(bfloat16)" for o in self.session.get_outputs())
        self.lora_inputs = {i.name: i for i in self.session.get_overridable_initializers()
                            if i.name.endswith((A_SUFFIX, B_SUFFIX))}
        self.adapters: dict[str, LoadedAdapter] = {}
        self.mixed = IDS_INPUT in self.inputs
        meta = self.session.get_modelmeta().custom_metadata_map.get(NAMES_META)
        self.rows: list[str] | None = (read_ids(self.path) or (json.loads(meta) if meta else None)
                                       ) if self.mixed else None

    @property
    def device(self) -> tuple[str, int]:
        """(device type, id) where the session runs: "cuda" on the CUDA provider, else "cpu"."""
        return ("cuda", 0) if self.provider == "CUDAExecutionProvider" else ("cpu", 0)

    def load(self, name: str, path: str | Path) -> LoadedAdapter:
        """Load an ``.onnx_adapter`` file as adapter ``name``, checking its parameter names
        and ranks against this model (ONNX Runtime would only fail at run time)."""

        path = Path(path)
        if path.is_dir():
            raise LoraFxError(f"adapter {path} is a directory: `lorafx run` takes an "
                              f".onnx_adapter file; make one with `lorafx convert-adapter {path} "
                              f"-o FILE.onnx_adapter --model {self.path}`")
        if not path.is_file():
            raise LoraFxError(f"adapter file {path} does not exist")
        try:
            params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
            handle = ort.LoraAdapter()
            handle.Load(str(path))
        except RuntimeError as err:
            raise LoraFxError(f"{path}: not an ONNX Runtime adapter file ({err})") from err
        ranks = self._check(path, params)
        options = ort.RunOptions()
        options.add_active_adapter(handle)
        loaded = LoadedAdapter(name, path, handle, options, self._on_device(params), ranks)
        if self.mixed:
            loaded.count = _set_size(path, params)
            loaded.rows = read_ids(path)
            if loaded.rows is not None and len(loaded.rows) != loaded.count:
                raise LoraFxError(f"{path} stacks {loaded.count - 1} adapters but its names "
                                  f"file lists {len(loaded.rows) - 1}: rewrite the set")
        elif any(len(value.shape()) == 3 for value in params.values()):
            raise LoraFxError(f"{path} is a mixed-batch adapter set but {self.path} is not a "
                              "mixed-batch model: export it with --mixed-batch")
        self.adapters[name] = loaded
        return loaded

    def unload(self, name: str) -> None:
        self.adapters.pop(name, None)

    def _check(self, path: Path, params: Mapping[str, Any]) -> dict[str, int]:
        """site → rank, after checking every name is an adapter input of this model and
        that every site of the model is covered (a missing one would run the defaults)."""
        unknown = sorted(set(params) - set(self.lora_inputs))
        if unknown:
            raise LoraFxError(f"{path}: parameter {unknown[0]!r} is not an adapter input of "
                              f"{self.path} (ONNX Runtime: 'Invalid input name'): the adapter is "
                              "for another model; convert it with `lorafx convert-adapter DIR "
                              f"--model {self.path}`")
        missing = sorted(set(self.lora_inputs) - set(params))
        if missing:
            raise LoraFxError(f"{path} lacks {missing[0]!r} (and {len(missing) - 1} more), so "
                              "those sites would run the exported adapter: convert it with "
                              f"`lorafx convert-adapter DIR --model {self.path}` to fill zeros")
        ranks: dict[str, int] = {}
        for name, value in params.items():
            if name.endswith(A_SUFFIX):
                site = name[: -len(A_SUFFIX)]
                r_a, r_b = value.shape()[-1], params[site + B_SUFFIX].shape()[-2]
                if r_a != r_b:
                    raise LoraFxError(f"{path}: site {site!r} has lora_A rank {r_a} but lora_B "
                                      f"rank {r_b}: rebuild the adapter file")
                ranks[site] = int(r_a)
        return ranks

    def _on_device(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The parameters as OrtValues on the session's device, copied there once (bf16 ones,
        which numpy cannot hold, stay on the host and are copied per call)."""

        kind, index = self.device
        if kind == "cpu":
            return dict(params)
        out: dict[str, Any] = {}
        for name, value in params.items():
            try:
                out[name] = ort.OrtValue.ortvalue_from_numpy(value.numpy(), kind, index)
            except RuntimeError:
                out[name] = value
        return out

    def _adapter(self, adapter: str | None) -> LoadedAdapter | None:
        if adapter is None:
            return None
        if adapter not in self.adapters:
            raise LoraFxError(f"adapter {adapter!r} is not loaded: loaded are "
                              f"{some(sorted(self.adapters), adapter)}")
        return self.adapters[adapter]

    def feeds(self, inputs: Inputs) -> dict[str, Any]:
        """Named inputs; a sequence is mapped onto the model's inputs in order."""
        if isinstance(inputs, Mapping):
            unknown = sorted(set(inputs) - set(self.inputs))
            if unknown:
                raise LoraFxError(f"input {unknown[0]!r} is not an input of {self.path}: its "
                                  f"inputs are {some(self.inputs, unknown[0])}")
            return {k: v if _is_ortvalue(v) else _array(v) for k, v in inputs.items()}
        return runtime.feeds(self.session, list(inputs))

    def with_rows(self, feeds: dict[str, Any], rows: Sequence[str | int] | None,
                  adapter: str | None = None) -> dict[str, Any]:
        """``feeds`` with ``adapter_ids`` for a mixed-batch model: from ``rows`` (a name of
        the active set, or an id, per batch row) or the ``adapter_ids`` given, each checked
        (one per row, in [0, n]) before ONNX Runtime runs; other models refuse ``rows``."""
        if not self.mixed:
            if rows is not None:
                raise LoraFxError(f"{self.path} takes one adapter per run, not one per row: "
                                  "export it with --mixed-batch, or pass adapter=")
            return feeds
        loaded = self._adapter(adapter)
        names = loaded.rows if loaded else self.rows
        count = loaded.count if loaded else len(self.rows or ())
        batch = _batch_size(feeds)
        if rows is not None and IDS_INPUT in feeds:
            raise LoraFxError(f"give the rows' adapters once: rows= or {IDS_INPUT}, not both")
        if rows is not None:
            ids = row_ids(list(rows), names, count, batch)
        elif IDS_INPUT in feeds:
            ids = check_ids(_host(feeds[IDS_INPUT]), count, batch)
        else:
            raise LoraFxError(f"{self.path} takes an adapter per batch row: pass rows= (names "
                              f"{', '.join(names or ['by id'])}) or {IDS_INPUT}")
        return {**feeds, IDS_INPUT: ids}

    def run(self, inputs: Inputs, adapter: str | None = None,
            rows: Sequence[str | int] | None = None) -> list[np.ndarray]:
        """Run with adapter ``adapter`` active (``RunOptions.add_active_adapter``); ``None``
        runs the defaults, i.e. the adapter (or set) the model was exported with. ``rows``:
        a mixed-batch model's adapter per batch row (see :meth:`with_rows`). bf16 outputs
        come back as float32 (numpy has no bfloat16), through :meth:`run_bound`."""
        if self.bf16_outputs:
            return self.run_bound(inputs, adapter, rows=rows)
        loaded = self._adapter(adapter)
        options = loaded.run_options if loaded else None
        feeds = self.with_rows(self.feeds(inputs), rows, adapter)
        return runtime.run_feeds(self.session, feeds, options, self.path)

    def run_bound(self, inputs: Inputs, adapter: str | None = None,
                  to_host: bool = True, rows: Sequence[str | int] | None = None) -> list[Any]:
        """Run through I/O binding: inputs, the adapter's parameters (already on the device)
        and outputs bound on the session's device; outputs copied to the host unless
        ``to_host`` is False (then OrtValues on the device)."""

        loaded = self._adapter(adapter)
        kind, index = self.device
        binding = self.session.io_binding()
        for name, value in self.with_rows(self.feeds(inputs), rows, adapter).items():
            if not _is_ortvalue(value):
                value = ort.OrtValue.ortvalue_from_numpy(value, kind, index)
            binding.bind_ortvalue_input(name, value)
        for name, value in (loaded.bound if loaded else {}).items():
            binding.bind_ortvalue_input(name, value)
        for name in self.outputs:
            binding.bind_output(name, kind, index)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as err:  # ONNX Runtime's Fail / InvalidArgument / RuntimeException
            raise runtime.run_error(err, self.path) from err
        if not to_host:
            return list(binding.get_outputs())
        if not self.bf16_outputs:
            return list(binding.copy_outputs_to_cpu())
        return [runtime.host_array(v) for v in binding.get_outputs()]

    def latency(self, inputs: Inputs, adapter: str | None = None, repeat: int = 20,
                warmup: int = 3, bound: bool = False,
                rows: Sequence[str | int] | None = None) -> list[float]:
        """Wall-clock seconds of ``repeat`` calls after ``warmup`` (sorted)."""
        call = self.run_bound if bound else self.run
        feeds = self.with_rows(self.feeds(inputs), rows, adapter)
        for _ in range(warmup):
            call(feeds, adapter)
        times = []
        for _ in range(max(repeat, 1)):
            start = time.perf_counter()
            call(feeds, adapter)
            times.append(time.perf_counter() - start)
        return sorted(times)


def _is_ortvalue(value: Any) -> bool:

    return isinstance(value, ort.OrtValue)


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        return np.ascontiguousarray(x.detach().cpu().numpy())
    return np.ascontiguousarray(x)


def _host(value: Any) -> np.ndarray:
    return np.asarray(value.numpy()) if _is_ortvalue(value) else np.asarray(value)


def _batch_size(feeds: Mapping[str, Any]) -> int | None:
    """Axis 0 of the first fed input other than the ids (the batch of a mixed-batch model)."""
    for name, value in feeds.items():
        shape = value.shape() if _is_ortvalue(value) else np.shape(value)
        if name != IDS_INPUT and len(shape):
            return int(shape[0])
    return None


def _set_size(path: Path, params: Mapping[str, Any]) -> int:
    """n + 1 of a mixed-batch set file: the stacks' leading axis, the same at every site."""
    sizes = {value.shape()[0] for value in params.values() if len(value.shape()) == 3}
    if len(sizes) != 1:
        raise LoraFxError(f"{path} is not a mixed-batch adapter set (stacked [n+1, in, r] "
                          "factors): write one with `lorafx convert-adapter A1 A2 ... "
                          "--mixed-batch`")
    return int(sizes.pop())
