"""Emit ONNX with the dynamo exporter, atomically, and check it.

Merged export: W' = W + s·B@A folded first, so the file's op histogram is the base model's.
Models past 2 GB get external data. ``verify`` runs ONNX Runtime on the example inputs and
fails when max |ORT − PyTorch| > atol. Unmerged export: see ``onnx_unmerged``. ``dtype``
fp16/bf16: merge in fp32, cast once, report the error against fp32.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from . import fileio, memory
from .errors import LoraFxError, LoraFxWarning
from .fileio import check_writable_dir
from .onnxscript_rules import forget_rewriter_state, op_type_first

if TYPE_CHECKING:
    from .onnx_stream import Layout

EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with room for the graph
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# verification of a cast export: max |ORT − fp32 PyTorch| <= rtol · max(1, max |y|)
DTYPE_RTOL = {"fp32": 0.0, "fp16": 1e-2, "bf16": 6e-2}


@dataclass
class ExportReport:
    path: Path
    merged: bool
    seconds: float
    external_data: bool
    op_histogram: dict[str, int]
    max_abs_diff: float | None = None
    provider: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def op_histogram(model: Any) -> Counter[str]:
    """``domain::op_type`` counts over the graph, its subgraphs and local functions.

    ``model``: an ``onnx.ModelProto``, or an ``onnx_ir.Model`` (an ONNXProgram's ``.model``),
    which is walked as is: ``program.model_proto`` would serialize every weight (a full copy).
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        return _ir_histogram(model)
    counts: Counter[str] = Counter()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[f"{node.domain or 'ai.onnx'}::{node.op_type}"] += 1
            for attr in node.attribute:
                if attr.g is not None and attr.HasField("g"):
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    for fn in model.functions:
        for node in fn.node:
            counts[f"{node.domain or 'ai.onnx'}::{node.op_type}"] += 1
    return counts


def _ir_histogram(model: Any) -> Counter[str]:
    """``op_histogram`` of an ``onnx_ir.Model``: the same counts, no tensor touched."""
    from onnx_ir.traversal import RecursiveGraphIterator

    counts: Counter[str] = Counter(f"{n.domain or 'ai.onnx'}::{n.op_type}"
                                   for n in RecursiveGraphIterator(model.graph))
    for fn in model.functions.values():
        counts.update(f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in fn)
    return counts


def initializer_bytes(model: Any) -> int:
    """Bytes of an ``onnx_ir.Model``'s initializers (what external data would hold)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None)


def flat_outputs(out: Any) -> list[torch.Tensor]:
    """PyTorch outputs flattened as the exporter flattens them (tensors only)."""
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


@contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the exporter's warnings and onnxscript's constant-folding log lines
    ("Evaluation failed: ...": a constant it could not fold is left as computed at run time,
    which is not an error) while exporting."""
    folding = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folding.level
    folding.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        folding.setLevel(level)


def to_onnx(model: nn.Module | torch.export.ExportedProgram, example_inputs: tuple[Any, ...],
            dynamic_shapes: Any = None, opset: int | None = None,
            translations: dict[Any, Any] | None = None) -> Any:
    """torch.onnx.export(dynamo=True) → ONNXProgram, with actionable errors.

    ``model``: a module (exported in eval mode, its mode restored after) or an ExportedProgram
    (exported as it is; ``example_inputs`` then ``()``). ``translations``: the exporter's
    ``custom_translation_table`` (op → onnxscript function).
    """
    kwargs: dict[str, Any] = {"dynamo": True, "verbose": False, "optimize": True}
    if opset is not None:
        kwargs["opset_version"] = opset
    if translations:
        kwargs["custom_translation_table"] = translations
    if dynamic_shapes is not None:
        kwargs["dynamic_shapes"] = dynamic_shapes
    try:
        with eval_mode(model), quiet_exporter(), op_type_first():
            return torch.onnx.export(model, tuple(example_inputs), **kwargs)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LoraFxError(f"ONNX export failed: {type(err).__name__}: {first}; try another "
                          "--opset or report the model") from err


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """``model`` in eval mode inside the block, its own mode restored after (also on error);
    anything that is not a module (an ExportedProgram) is left as it is."""
    if not isinstance(model, nn.Module):
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def save_program(program: Any, path: Path, external_data: bool | None = None
                 ) -> tuple[bool, Layout | None]:
    """Save atomically: into a temporary dir beside ``path``, then rename data and model.
    Returns (whether the weights went to external data, the streamed file's ``Layout``).

    External data goes to a file named for this export (``model.onnx.<pid>.<8 hex>.data``), so
    the rename of the data never touches the data of the model being replaced: a kill at any
    point leaves the previous model with its data, or the new one with its own. The replaced
    model's data file is deleted once the new model is in place, and data files of killed
    exports (their process gone, no model referencing them) at the start of the next one.
    """
    from .onnx_stream import write_model
    path = Path(path)
    check_writable_dir(path.parent.resolve())
    size = initializer_bytes(program.model)  # not model_proto: that copies every weight
    use_external = size > EXTERNAL_DATA_BYTES if external_data is None else external_data
    fileio.sweep_stale(path.parent, path.name)  # leftovers of killed exports
    tmp = fileio._temp_path(path.parent, path.name)  # .NAME.PID.RAND.tmp: swept if we die
    tmp.mkdir()
    try:
        replaced = _own_data_files(path)
        fileio.sweep_dead(path.parent, _data_pattern(path.name), keep=replaced)
        layout = None
        if use_external:
            import onnx_ir as ir

            ir.save(program.model, tmp / path.name,
                    external_data=f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.data")
        else:  # weights streamed from memory, no serialized copy of the model (onnx_stream)
            layout = write_model(program.model, tmp / path.name)
        written = {f.name for f in tmp.iterdir()} - {path.name}
        for name in written:
            os.replace(tmp / name, path.parent / name)
        os.replace(tmp / path.name, path)
        for name in replaced - written:
            (path.parent / name).unlink(missing_ok=True)
    except Exception as err:
        mapped = fileio.io_error(path, err)
        if mapped is None:
            raise
        raise mapped from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return use_external, layout


def _data_pattern(name: str) -> re.Pattern[str]:
    """The data file names ``save_program`` gives model ``name``: ``NAME.<pid>.<8 hex>.data``."""
    return re.compile(re.escape(name) + r"\.(\d+)\.[0-9a-f]{8}\.data")


def _own_data_files(path: Path) -> set[str]:
    """External-data files that ``path`` (a model about to be replaced) references under a name
    lorafx gives (``_data_pattern``, or the exporter's default ``NAME.data``). Big single files
    are not parsed (a model that keeps its weights outside is small), nor is any model when no
    such file is beside it."""
    ours = _data_pattern(path.name)

    def named(name: str) -> bool:
        return bool(ours.fullmatch(name)) or name == f"{path.name}.data"

    if not path.is_file() or path.stat().st_size > 64 * 2**20 or \
            not any(named(f.name) for f in path.parent.iterdir()):
        return set()
    try:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not an ONNX model: nothing of ours to clean up
        return set()
    return {e.value for t in proto.graph.initializer for e in t.external_data
            if e.key == "location" and named(e.value)}


def export_onnx(gm: nn.Module, example_inputs: tuple[Any, ...], path: str | Path,
                merge: bool = True, opset: int | None = None, verify: bool = True,
                dynamic_shapes: Any = None, atol: float = 1e-4,
                providers: list[str] | None = None, dtype: str | None = None,
                model: nn.Module | None = None, release: bool = False) -> ExportReport:
    """Export ``gm`` (an injected GraphModule, or any module) to ONNX at ``path``.

    ``merge=True`` folds every branch first (the file is the base model's graph with new
    weights); ``merge=False`` keeps each branch as MatMul(x, A')→MatMul(·, B')→Add with A', B'
    as ONNX Runtime adapter inputs (``onnx_unmerged``). ``verify`` compares ONNX Runtime's
    outputs with PyTorch's on ``example_inputs`` and raises LoraFxError above ``atol``.
    ``dtype`` "fp16"/"bf16": merge in fp32, cast every floating weight once (see ``lowered``:
    a torch.export capture also needs the eager ``model``); ``extras["error_vs_fp32"]`` holds
    max |y − y_fp32| of PyTorch and ONNX Runtime, and verification allows
    ``DTYPE_RTOL[dtype] · max(1, max |y_fp32|)``.

    ``release=True`` (models too big for two copies) consumes the model: an fp32 merge folds
    W' into each weight's own storage (``merge(inplace=True)``: no second copy), and after the
    export PyTorch's outputs are kept, every weight of ``gm`` (and so of the user's model, which
    shares them) is freed, then ONNX Runtime verifies; the model cannot run afterwards.
    """
    from . import api
    from .passes.state import get_state

    if dtype is not None and dtype not in DTYPES:
        raise LoraFxError(f"dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)}")
    start = time.perf_counter()
    dtype = None if dtype in (None, "fp32") else dtype
    state = get_state(gm)
    unmerged = not merge and state is not None
    inplace = release and dtype is None  # a cast export merges a copy in fp32
    reference: nn.Module = api.merge(gm, inplace=inplace) if merge and state is not None else gm
    module, args = reference, tuple(example_inputs)
    if unmerged:
        from .onnx_unmerged import deploy_module
        module = deploy_module(gm)
    if dtype is not None:
        args = cast_inputs(args, dtype)
        module = lowered(gm, module, unmerged, dtype, args, model, dynamic_shapes)
    from .fast import captured_program
    reuse = None if unmerged or dtype is not None or dynamic_shapes is not None \
        else captured_program(module)  # the capture's own program: no second trace
    if dynamic_shapes is None and isinstance(module, fx.GraphModule):
        dynamic_shapes = _auto(args)
    extras: dict[str, Any] = {}
    # frozen: ~5% faster; not when memory is what counts (release): garbage made before the
    # export (the merge's) would stay through its peak (+20 MB on a 2.2 GB model)
    with nullcontext() if release else memory.collector_frozen():
        if unmerged:
            from .onnx_unmerged import export_unmerged
            program, extras["lora_inputs"] = export_unmerged(module, args, dynamic_shapes,
                                                             opset)
        elif reuse is not None:
            program = to_onnx(reuse, (), opset=opset)
        else:
            program = to_onnx(module, args, dynamic_shapes, opset)
    memory.trim()  # what tracing and translating freed: not resident while saving
    external, layout = save_program(program, Path(path))
    report = ExportReport(Path(path), merge, 0.0, external, dict(op_histogram(
        program.model)), extras=extras)
    del program  # its IR may hold tensors of its own (folded constants): free them first
    forget_rewriter_state()
    if dtype is not None:
        error = torch_max_diff(forward(module, args), forward(reference, example_inputs))
        report.extras.update(dtype=dtype, error_vs_fp32={"pytorch": error})
    want = forward(reference, example_inputs) if verify else None
    if release:
        release_weights(gm, reference, module, *([model] if model is not None else []))
        memory.trim()
    if want is not None:
        verify_file(report, args, want, atol, providers, dtype, lean=release, layout=layout)
    report.seconds = time.perf_counter() - start
    return report


def release_weights(*modules: nn.Module) -> None:
    """Free the memory of every parameter and buffer of ``modules`` (each becomes an empty
    tensor of its dtype): anything sharing them, the user's model included, cannot run after."""
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)


def lowered(gm: nn.Module, module: nn.Module, unmerged: bool, dtype: str,
            args: tuple[Any, ...], model: nn.Module | None, dynamic_shapes: Any) -> nn.Module:
    """``module`` (``gm`` merged in fp32, or its deploy form) with its weights cast once.

    A symbolic-trace capture or plain module is cast in a copy. A torch.export capture is
    specialized to fp32 (``to(float32)`` for ``to(x.dtype)``, metadata asserts), so the eager
    ``model`` it came from is cast and captured again, as the model's code intends (fp32
    upcasts such as RMSNorm's and rotary's stay fp32), and ``gm``'s merged site weights,
    modules_to_save and branches (A', B' computed in fp32) are carried over.
    """
    from . import api
    from .capture import CAPTURE_KEY, capture
    from .onnx_unmerged import deploy_module
    from .passes.state import get_state, set_attr_cow

    if not (isinstance(gm, fx.GraphModule) and gm.meta.get(CAPTURE_KEY) == "export"):
        return cast_module(module, dtype)
    if model is None:
        raise LoraFxError(f"a {dtype} export of a torch.export capture needs the eager model: "
                          "pass model= (the module the GraphModule was captured from)")
    low = cast_module(model, dtype)
    state = get_state(gm)
    if state is None:
        return capture(low, args, dynamic_shapes)
    for name in state.saved:
        set_attr_cow(low, name, cast_module(gm.get_submodule(name), dtype))
    if unmerged:
        low_gm = api.apply_adapter(low, args, api.to_adapter(gm), dynamic_shapes)
        return deploy_module(low_gm, source=gm, dtype=DTYPES[dtype])
    for rec in state.sites.values():
        weight = module.get_parameter(rec.weight).detach().to(DTYPES[dtype])
        set_attr_cow(low, rec.weight, nn.Parameter(weight, requires_grad=False))
    return capture(low, args, dynamic_shapes)


def cast_module(module: nn.Module, dtype: str) -> nn.Module:
    """A copy of ``module`` whose floating parameters and buffers are cast once to ``dtype``
    (tied tensors stay tied); ``module`` and the user's model keep theirs (copy-on-write).
    """
    from .onnx_unmerged import shallow_copy
    from .passes.state import set_attr_cow

    if dtype not in DTYPES:
        raise LoraFxError(f"dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)}")
    target = DTYPES[dtype]
    new = shallow_copy(module)
    cast: dict[int, torch.Tensor] = {}
    named = [*new.named_parameters(remove_duplicate=False),
             *new.named_buffers(remove_duplicate=False)]
    for name, t in named:
        if not t.is_floating_point() or t.dtype == target:
            continue
        if id(t) not in cast:
            low = t.detach().to(target)
            cast[id(t)] = nn.Parameter(low, requires_grad=False) \
                if isinstance(t, nn.Parameter) else low
        set_attr_cow(new, name, cast[id(t)])
    return new


def cast_inputs(args: tuple[Any, ...], dtype: str) -> tuple[Any, ...]:
    """Floating tensor inputs cast to ``dtype``; integer ones (token ids) unchanged."""
    target = DTYPES[dtype]
    return tuple(a.to(target) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


def forward(module: nn.Module, args: tuple[Any, ...]) -> list[torch.Tensor]:
    """``module(*args)`` in eval mode without grad, outputs flattened; the mode is restored."""
    with eval_mode(module), torch.no_grad():
        return flat_outputs(module(*args))


def torch_max_diff(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """max |got − want| over all outputs, in fp64."""
    return max((float((g.double() - w.double()).abs().max()) for g, w in
                zip(got, want, strict=True) if w.numel()), default=0.0)


def _auto(example_inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    auto = torch.export.Dim.AUTO
    return tuple({i: auto for i in range(t.dim())} if isinstance(t, torch.Tensor) else None
                 for t in example_inputs)


def verify_onnx(report: ExportReport, module: nn.Module, example_inputs: tuple[Any, ...],
                atol: float = 1e-4, providers: list[str] | None = None,
                run_inputs: tuple[Any, ...] | None = None, dtype: str | None = None) -> None:
    """Run the file in ONNX Runtime and compare with PyTorch; raise above ``atol``.

    A cast export (``dtype``) runs on ``run_inputs`` and is compared with ``module``'s fp32
    outputs, allowing ``DTYPE_RTOL[dtype] · max(1, max |y|)``; a bf16 file that the provider
    cannot run (no bf16 kernels on the CPU) is reported unverified with a warning.
    """
    verify_file(report, run_inputs if run_inputs is not None else example_inputs,
                forward(module, example_inputs), atol, providers, dtype)


def verify_file(report: ExportReport, inputs: tuple[Any, ...], want: list[torch.Tensor],
                atol: float = 1e-4, providers: list[str] | None = None,
                dtype: str | None = None, lean: bool = False,
                layout: Layout | None = None) -> None:
    """Run ``report.path`` in ONNX Runtime on ``inputs`` and compare with PyTorch's outputs
    ``want``; raise above ``atol``. No model needs to be alive: for big models, compute
    ``want``, release the model, then verify (one copy of the weights at a time); ``lean``:
    a session that holds the weights once (``runtime.open_session``). ``layout``: the file
    was streamed by ``onnx_stream.write_model``; ONNX Runtime loads it through a view that
    maps its weights in place (``onnx_stream.external_view``) instead of copying them.
    """
    from . import runtime

    try:
        with _loadable(report.path, layout) as model_file:
            sess = runtime.open_session(model_file, providers, lean=lean)
    except LoraFxError as err:
        if dtype != "bf16" or "NOT_IMPLEMENTED" not in str(err):
            raise
        warnings.warn(f"{report.path} not verified: ONNX Runtime cannot run bf16 here ({err}); "
                      "run it on the CUDA provider", LoraFxWarning, stacklevel=2)
        report.extras["verify_skipped"] = str(err)
        return
    got = runtime.run(sess, inputs)
    report.max_abs_diff = runtime.max_abs_diff(got, want)
    report.provider = runtime.session_provider(sess)
    limit = atol
    if dtype is not None:
        report.extras.setdefault("error_vs_fp32", {})["onnxruntime"] = report.max_abs_diff
        scale = max((float(w.abs().max()) for w in want if w.numel()), default=0.0)
        limit = max(atol, DTYPE_RTOL[dtype] * max(1.0, scale))
    if not report.max_abs_diff <= limit:
        raise LoraFxError(f"verification failed: max |ONNX Runtime - PyTorch| = "
                          f"{report.max_abs_diff:.3g} > {limit:g} on {report.provider}; the file "
                          f"{report.path} was written, do not deploy it")


@contextmanager
def _loadable(path: Path, layout: Layout | None) -> Iterator[Path]:
    """``path``, or for a file that ``write_model`` streamed, a temporary view of it written
    beside it and removed on exit (ONNX Runtime has mapped the weights by then); an error
    naming the view names ``path`` instead. Where the view cannot be written (disk full),
    ``path`` itself."""
    from .onnx_stream import external_view

    if layout is None:
        yield path
        return
    view = fileio._temp_path(path.parent, path.name)
    try:
        view.write_bytes(external_view(layout, path))
    except OSError:
        view.unlink(missing_ok=True)
        yield path
        return
    try:
        yield view
    except LoraFxError as err:
        raise LoraFxError(str(err).replace(str(view), str(path))) from err
    finally:
        view.unlink(missing_ok=True)
