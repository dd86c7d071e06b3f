"""Save an ONNXProgram atomically, with external data past protobuf's 2 GB limit.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from .. import deploy_format, fileio
from ..fileio import check_writable_dir
from ..progress import stage
from .report import initializer_bytes
from .stream import Layout, write_model


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
    path = Path(path)
    check_writable_dir(path.parent.resolve())
    with stage("writing the file"):
        return _save(program, path, external_data)


def _save(program: Any, path: Path, external_data: bool | None) -> tuple[bool, Layout | None]:
    size = initializer_bytes(program.model)  # not model_proto: that copies every weight
    use_external = (size > deploy_format.EXTERNAL_DATA_BYTES if external_data is None
                    else external_data)
    fileio.sweep_stale(path.parent, path.name)  # leftovers of killed exports
    tmp = fileio.temp_path(path.parent, path.name)  # .NAME.PID.RAND.tmp: swept if we die
    tmp.mkdir()
    try:
        replaced = _own_data_files(path)
        fileio.sweep_dead(path.parent, _data_pattern(path.name), keep=replaced)
        layout = None
        if use_external:

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

        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not an ONNX model: nothing of ours to clean up
        return set()
    return {e.value for t in proto.graph.initializer for e in t.external_data
            if e.key == "location" and named(e.value)}

