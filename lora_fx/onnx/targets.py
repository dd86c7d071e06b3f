"""Targets: what an export traces, how its file is named and written, and what it is checked on.

- ``Plain``: a module (an injected GraphModule, a capture, or any module) on its example
  inputs; the file is ``path``; checked on the example and on another batch and length where
  the file keeps those axes symbolic (``onnx.shapes``).
- ``Decoder``: a Hugging Face decoder wrapped with its KV cache (``onnx.kv_cache``): ORT
  GenAI's input and output names, a folder with ``genai_config.json``, the tokenizer files,
  and (unmerged) the adapter file; checked on a decode step at past 3 and a prefill at past 0,
  with and without the adapter file active.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ..adapter.peft import Adapter, read_adapter
from ..capture.trace import capture
from ..deploy_format import IDS_INPUT, write_ids
from ..errors import LoraFxError, LoraFxWarning
from ..fileio import check_writable_dir
from ..graph.state import get_state
from ..model.adapters import apply_adapter
from ..model.merge import without_branches
from ..ort.adapters import write_ort_adapter
from .fuse import fuse as fuse_decoder
from .genai import write_genai_files
from .kv_cache import KvModule, kv_decoder, name_io, trace_inputs
from .mixed_program import name_ids, name_inputs
from .prepare import cast_module, lowered
from .report import ExportReport
from .save import save_program
from .shapes import fixed_axes, second_shape, shape_text, symbolic_axes
from .stream import Layout
from .verify import Case

if TYPE_CHECKING:
    from .forms import Built, Form


class Plain:
    """``module`` on ``args``; ``eager``: the eager model a torch.export capture came from
    (a lowered precision captures it again); ``dynamic_shapes``: torch.export's form."""

    writes_adapter_file = False

    def __init__(self, module: nn.Module, args: tuple[Any, ...], dynamic_shapes: Any = None,
                 eager: nn.Module | None = None) -> None:
        self.module, self.args = module, tuple(args)
        self.dynamic_shapes, self.eager = dynamic_shapes, eager

    def check(self, path: Path, precision: str, form: Form) -> None:
        """Nothing to refuse before the work (the CLI checks the output path)."""

    def injected(self, adapter: str | Path | Adapter | None) -> nn.Module:
        if adapter is not None:
            raise LoraFxError("internal error: a plain export takes its adapter injected")
        return self.module

    def base_model(self) -> nn.Module:
        return self.module

    def without_adapter(self, form: Form) -> Plain | None:
        """This target over the base model (branches erased), for a merged export that has
        an adapter; None otherwise."""
        if form.name != "merged" or get_state(self.module) is None:
            return None
        return Plain(without_branches(self.module), self.args, self.dynamic_shapes, self.eager)

    def lowered(self, precision: str, args: tuple[Any, ...]) -> nn.Module:
        return lowered(self.module, self.module, False, precision, args, None,
                       self.dynamic_shapes)

    def owned(self) -> list[nn.Module]:
        return [self.eager] if self.eager is not None else []

    def trace_shapes(self, reuse: bool) -> Any:
        return self.dynamic_shapes

    def name_io(self, model: Any, built: Built) -> None:
        if built.ids is not None:
            name_inputs(model, self.module, len(self.args))

    def fuse(self, model: Any) -> dict[str, int]:
        """Nothing: only decoders are fused (``onnx.fuse``)."""
        return {}

    def save(self, program: Any, path: Path) -> tuple[bool, Layout | None]:
        return save_program(program, path)

    def notes(self, model: Any, built: Built) -> dict[str, Any]:
        return {"adapters": built.names} if built.ids is not None else \
            {"fixed_axes": fixed_axes(model)}

    def symbolic(self, model: Any, built: Built) -> Any:
        return symbolic_axes(model, sum(hasattr(a, "shape") for a in self.args))

    def side_files(self, report: ExportReport, built: Built) -> None:
        if built.ids is not None:
            report.extras["ids_file"] = str(write_ids(report.path, built.names))

    def cases(self, report: ExportReport, built: Built, axes: Any) -> list[Case]:
        """The example, and (not for a mixed batch) another batch and length."""
        base = built.base(self.args) if built.base is not None else None
        cases = [Case("example", built.feeds(self.args), built.reference(self.args), base)]
        second = self._second(built, axes) if built.ids is None and axes is not None else None
        return cases + ([second] if second is not None else [])

    def _second(self, built: Built, axes: Any) -> Case | None:
        """Another batch and length on the file's symbolic axes (batch only where PyTorch
        refuses the length: a position limit); None, with a warning, where it refuses both."""
        for length in (True, False):
            inputs = second_shape(self.args, axes, length)
            if inputs is None:
                return None
            try:  # a GraphModule prints the failing call's traceback to stderr: keep it quiet
                with contextlib.redirect_stderr(io.StringIO()):
                    want = built.reference(inputs)
            except Exception:  # noqa: BLE001 - the model's own limits: try a smaller change
                continue
            base = built.base(inputs) if built.base is not None else None
            return Case(shape_text(inputs), built.feeds(inputs), want, base)
        warnings.warn(f"the exported file was verified at the example's shape only: PyTorch "
                      f"fails at batch {shape_text(second_shape(self.args, axes, False) or ())}",
                      LoraFxWarning, stacklevel=2)
        return None


class Decoder:
    """The Hugging Face decoder ``model`` with its KV cache; ``source``: its save_pretrained
    directory (tokenizer files); ``adapter_name``: the stem of an unmerged export's adapter
    file."""

    writes_adapter_file = True

    def __init__(self, model: nn.Module, source: str | Path | None = None,
                 adapter_name: str = "adapter") -> None:
        self.model, self.source, self.adapter_name = model, source, adapter_name
        self._kv: KvModule | None = None

    @property
    def kv(self) -> KvModule:
        if self._kv is None:
            self._kv = kv_decoder(self.model)
        return self._kv

    @property
    def args(self) -> tuple[Any, ...]:
        return self.kv.example_inputs

    @property
    def dynamic_shapes(self) -> Any:
        return self.kv.dynamic_shapes

    @property
    def eager(self) -> nn.Module:
        return self.kv.wrapper

    def check(self, path: Path, precision: str, form: Form) -> None:
        """Refuse a precision ONNX Runtime cannot verify, and an unwritable folder."""
        check_kv_dtype(precision)
        self.kv  # noqa: B018 - refuses a model that is no decoder before any file is touched
        if not path.parent.exists():  # refused now, created once there is something to write
            check_writable_dir(path.parent.parent.resolve())

    def injected(self, adapter: str | Path | Adapter | None) -> nn.Module:
        kv = self.kv
        if adapter is None:
            gm = capture(kv.wrapper, kv.example_inputs, kv.dynamic_shapes, method="export")
        else:
            loaded = adapter if isinstance(adapter, Adapter) else read_adapter(adapter)
            where = "adapter" if isinstance(adapter, Adapter) else str(adapter)
            gm = apply_adapter(kv.wrapper, kv.example_inputs, loaded, kv.dynamic_shapes,
                               where=where)
        return gm.eval()

    def base_model(self) -> nn.Module:
        return self.kv.wrapper

    def without_adapter(self, form: Form) -> Decoder | None:
        """This decoder (exported with no adapter), for a merged export that has one."""
        return self if form.name == "merged" and getattr(form, "adapter", None) else None

    def lowered(self, precision: str, args: tuple[Any, ...]) -> nn.Module:
        return cast_module(self.kv.wrapper, precision)

    def owned(self) -> list[nn.Module]:
        return []

    def trace_shapes(self, reuse: bool) -> Any:
        return None if reuse else self.kv.dynamic_shapes  # a reused capture's are dynamic

    def name_io(self, model: Any, built: Built) -> None:
        name_io(model, self.kv.layout)
        if built.ids is not None:
            name_ids(model, len(self.kv.layout.input_names()))

    def fuse(self, model: Any) -> dict[str, int]:
        """ONNX Runtime's fused ops where onnxscript's rules match (``onnx.fuse``), in place."""
        return fuse_decoder(model)

    def save(self, program: Any, path: Path) -> tuple[bool, Layout | None]:
        path.parent.mkdir(exist_ok=True)  # the export is a folder
        return save_program(program, path)

    def notes(self, model: Any, built: Built) -> dict[str, Any]:
        return {}

    def symbolic(self, model: Any, built: Built) -> Any:
        return None

    def side_files(self, report: ExportReport, built: Built) -> None:
        """genai_config.json, the tokenizer files, the adapter file (unmerged), the ids
        file (a mixed batch)."""
        report.layout = self.kv.layout
        report.copied = write_genai_files(report.path.parent, self.kv.layout, report.path.name,
                                          self.source)
        if built.params:
            report.adapter_file = write_ort_adapter(
                built.params, report.path.parent / f"{self.adapter_name}.onnx_adapter",
                force=True)
        if built.ids is not None:
            write_ids(report.path, built.names)

    def cases(self, report: ExportReport, built: Built, axes: Any) -> list[Case]:
        """A decode step at past 3 (the traced shapes) and a prefill at past 0 (5 tokens);
        a file whose adapter defaults are zero runs as the base model, then with its
        adapter file active."""
        layout = self.kv.layout
        rows = 1 if built.ids is None else len(built.ids)
        prefill, _ = trace_inputs(layout, seed=1, batch=rows, seq=5, past=0)
        names = layout.input_names() + ([IDS_INPUT] if built.ids is not None else [])
        runs = (("decode", self.kv.example_inputs), ("prefill", prefill))

        def feeds(args: tuple[Any, ...]) -> dict[str, Any]:
            return dict(zip(names, flat_inputs(built.feeds(args)), strict=True))

        if report.adapter_file is None:
            return [Case(name, feeds(args), built.reference(args),
                         built.base(args) if built.base is not None else None)
                    for name, args in runs]
        base = built.base
        assert base is not None
        plain = [Case(name, feeds(args), _known(base(args))) for name, args in runs]
        return plain + [Case(f"{name}+adapter", feeds(args), built.reference(args),
                             base(args), adapter=report.adapter_file)
                        for name, args in runs]


def _known(outputs: list[Any] | None) -> list[Any]:
    if outputs is None:
        raise LoraFxError("internal error: the base model's outputs are gone (released)")
    return outputs


def check_kv_dtype(dtype: str) -> None:
    """Refuse a KV-cache dtype other than fp32, fp16, int4 and int8, with why."""
    if dtype not in ("fp32", "fp16", "int4", "int8"):
        raise LoraFxError(f"--kv-cache exports fp32 or fp16, not --dtype {dtype} (int4 and "
                          "int8 quantize an fp32 file): ONNX Runtime has no bf16 kernels on the "
                          "CPU to verify such a decoder; use fp16")


def flat_inputs(args: tuple[Any, ...]) -> list[Any]:
    """The decoder's inputs flat: the list of past tensors spread."""
    out: list[Any] = []
    for a in args:
        out.extend(a if isinstance(a, list) else [a])
    return out


Target = Plain | Decoder
