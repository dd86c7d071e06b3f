"""Write an ONNX model without building its serialized copy in memory.

An ONNX file is one protobuf ``ModelProto``. Protobuf merges repeated occurrences of an
embedded message field (``ModelProto.graph`` = field 7) and appends repeated fields
(``GraphProto.initializer`` = field 5), so

    file = bytes(model without its weights) + Σ_w  ⟨7: ⟨5: TensorProto(w)⟩⟩

parses to the same model. Each ``TensorProto`` is its small header (name, dims, data_type)
followed by ``raw_data`` (field 9, little-endian bytes) written straight from the tensor's
memory. ``onnx_ir.save`` instead holds the whole ``ModelProto`` and then its bytes: two extra
copies of every weight (1.4 GB for GPT-2 small) and the time to make them.

``write_model`` returns where each weight's bytes lie in the file (``Layout``), and
``external_view`` turns that into a small model with the same graph whose weights are ONNX
external data pointing into the file itself. ONNX Runtime memory-maps external data (file
pages, which the kernel can drop), while a weight inside a protobuf is copied out of the parsed
file, with a transient of its own: a session on the view holds far less anonymous memory
(benchmarks/README.md).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir import serde

_GRAPH, _INITIALIZER, _RAW_DATA = 7, 5, 9


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(field: int, length: int) -> bytes:
    """Tag (wire type 2: length-delimited) and length of a field."""
    return _varint(field << 3 | 2) + _varint(length)


def _raw(value: Any) -> tuple[bytes, memoryview] | None:
    """(TensorProto header, data bytes) of an initializer, or None to serialize it normally."""
    tensor = value.const_value
    if tensor is None or tensor.dtype in (ir.DataType.STRING, ir.DataType.UNDEFINED) or \
            tensor.dtype.bitwidth < 8 or getattr(tensor, "doc_string", None) or \
            getattr(tensor, "metadata_props", None) or sys.byteorder != "little":
        return None
    try:
        array = np.ascontiguousarray(tensor.numpy())
    except Exception:  # noqa: BLE001 - anything unusual goes through the serializer
        return None
    header = onnx.TensorProto(name=value.name, data_type=int(tensor.dtype),
                              dims=[int(d) for d in tensor.shape]).SerializeToString()
    return header, array.reshape(-1).view(np.uint8).data


@dataclass
class Layout:
    """A file ``write_model`` wrote: ``head`` (the model without its streamed weights), then per
    weight a chunk whose last ``length`` bytes, at ``offset`` in the file, are its raw data;
    ``header`` is the weight's TensorProto without data (name, dims, data_type)."""

    head: bytes
    tensors: list[tuple[bytes, int, int]]  # (header, offset, length)


def write_model(model: Any, path: str | Path) -> Layout:
    """Save an ``onnx_ir.Model`` at ``path`` as one protobuf file, weights streamed."""
    streamed = [(v, raw) for v in model.graph.initializers.values()
                if (raw := _raw(v)) is not None]
    kept = {v.name: v.const_value for v, _ in streamed}
    empty = ir.Tensor(np.zeros(0, dtype=np.uint8))
    try:  # serialize with empty weights (value_info etc. as onnx_ir.save writes them)
        for v, _ in streamed:
            v.const_value = empty
        proto = serde.serialize_model(model)
    finally:
        for v, _ in streamed:
            v.const_value = kept[v.name]
    rest = [t for t in proto.graph.initializer if t.name not in kept]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(rest)
    head = proto.SerializeToString()
    layout = Layout(head, [])
    with open(path, "wb") as fh:
        fh.write(head)
        offset = len(head)
        for _, (header, data) in streamed:
            data_key = _key(_RAW_DATA, len(data))
            tensor_len = len(header) + len(data_key) + len(data)
            init_key = _key(_INITIALIZER, tensor_len)
            prefix = _key(_GRAPH, len(init_key) + tensor_len) + init_key + header + data_key
            fh.write(prefix)
            fh.write(data)
            layout.tensors.append((header, offset + len(prefix), len(data)))
            offset += len(prefix) + len(data)
    return layout


def external_view(layout: Layout, path: str | Path, inline_below: int = 1024) -> bytes:
    """A model file's bytes: ``layout.head`` plus each streamed weight as a TensorProto whose
    data is external, at (offset, length) in ``path`` (the file ``write_model`` wrote, read
    in place; a view written beside it names it by its base name). Weights under
    ``inline_below`` bytes are copied in instead: ONNX Runtime's shape inference reads small
    constants (axes, shapes) and cannot read them from external data."""
    path = Path(path)
    chunks = [layout.head]
    with open(path, "rb") as fh:
        for header, offset, length in layout.tensors:
            tensor = onnx.TensorProto()
            tensor.ParseFromString(header)
            if length < inline_below:
                fh.seek(offset)
                tensor.raw_data = fh.read(length)
            else:
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", path.name), ("offset", str(offset)),
                                   ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
            body = tensor.SerializeToString()
            init = _key(_INITIALIZER, len(body)) + body
            chunks.append(_key(_GRAPH, len(init)) + init)
    return b"".join(chunks)
