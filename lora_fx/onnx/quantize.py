"""Weight-only int4 / int8 quantization of an exported file's base weights; LoRA inputs untouched.

Every MatMul ``y = x·W`` whose ``W`` [K, N] is a constant initializer becomes ONNX Runtime's
``MatMulNBits(x, Q, s[, z])`` (com.microsoft) through onnxruntime's own
``MatMulNBitsQuantizer`` (no quantizer is written here). ``W`` is cut along K into blocks of
``block`` rows, and per block b and column n (round to nearest on the block's grid)

    W[k, n] ≈ s[b, n] · (q[k, n] − z[b, n]),    q ∈ {0, …, 2^bits − 1}

symmetric (the default, as ORT GenAI's model builder): z = 2^(bits−1) implied and s from the
block's largest magnitude; asymmetric: s and z from the block's min and max. ``accuracy_level``
is MatMulNBits' compute type for x (0/None unset, 1 fp32, 2 fp16, 3 bf16, 4 int8; the builder
uses 4 on the CPU and 0 elsewhere).

Methods: "default" ORT's MLAS blockwise RTN (``DefaultWeightOnlyQuantConfig``, the builder's
default; 4 or 8 bits), "rtn" (``RTNWeightOnlyQuantConfig``), "kquant"
(``KQuantWeightOnlyQuantConfig``), "hqq" (``HQQWeightOnlyQuantConfig``: optimized scales and
float zero points, always asymmetric, no accuracy level, 4 bits only: ONNX Runtime's CPU
MatMulNBits has no 8-bit kernel for float zero points).

Never quantized, whatever the method (the quantizer is told to exclude their nodes):
- a MatMul or Gather whose weight is a graph input: the unmerged files' adapter inputs
  ``<site>.lora_A.weight`` / ``<site>.lora_B.weight`` (initializers that are also inputs, ONNX
  Runtime's adapter convention) and the mixed-batch stacks that ``adapter_ids`` gathers;
- a weight whose name ends in ``.lora_A.weight`` / ``.lora_B.weight`` even where it is no input;
- the tensors and nodes named in ``keep``.
So A' and B' stay float, inputs of the file, and an adapter file swaps in as on the float file.

A linear on 2-D inputs exports as ``Gemm(x, W, b, transB=1)``: such a Gemm with a constant W
is rewritten ``Add(MatMul(x, Wᵀ), b)`` first, so that it quantizes too.

Embedding and LM head, as the builder treats them:
- the head is a MatMul and is quantized like the others. A tied head reads the embedding table
  E [V, H] as ``Transpose(E)`` in an export; that constant Eᵀ is written out (the Transpose
  dropped) so that the quantizer sees a constant weight.
- ``embeddings="tied"`` (default; the builder's ``shared_embeddings``): an embedding Gather whose
  table is the head's weight transposed (the same initializer, or equal values) reads the
  head's int4 blocks, so the table is stored once and equals the dequantized head:

      E'[ids] = Slice(GatherBlockQuantized(Reshape(Q_head, [V, K_pad·bits/8]), ids, s_head), H)

  (gather_axis 0, quantize_axis 1, block ``block``). It needs 4 bits and the symmetric
  "default" method (the layout the builder reuses); otherwise the table stays float.
- ``"all"``: every other float 2-D Gather table too (position embeddings, untied embeddings),
  through the quantizer's own Gather support: GatherBlockQuantized, int4 only, "default" only;
  the file's opset is raised to 21 for the int4 element types.
- ``"none"``: no Gather changes (a tied table then stays float beside the int4 head).
Not done: int8 embeddings (GatherBlockQuantized is int4 in the builder too), tied tables for
"rtn" / "kquant" / "hqq" / asymmetric blocks, QDQ format, calibrated methods (GPTQ, AWQ),
per-node bit widths (the builder's int8 head option).

Models: ``quantize`` takes an ``onnx.ModelProto`` (copied, never changed), an ``onnx_ir.Model``
(converted, returned as one) or a path (its external data loaded); ``quantize_file`` writes the
result through ``lora_fx.onnx.save.save_program`` (atomic, external data past
``EXTERNAL_DATA_BYTES``). Nothing here serializes the whole model, so weights past protobuf's
2 GB limit stay in memory until the file is written with external data (the "default" and
"hqq" paths never serialize; "rtn" / "kquant" only warn past 2 GB); not exercised past 2 GB
here. Memory: the float model, its ModelProto copy, and the packed weights while quantizing.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, overload

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from ..deploy_format import A_SUFFIX, B_SUFFIX
from ..errors import LoraFxError
from .save import save_program

METHODS = ("default", "rtn", "kquant", "hqq")
EMBEDDINGS = ("tied", "all", "none")
BLOCKS = (16, 32, 64, 128, 256)
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
_MS = "com.microsoft"


@dataclass
class _Plan:
    """What the quantizer is asked to do: every MatMul / Gather not selected is excluded."""

    matmuls: list[str] = field(default_factory=list)      # base MatMuls to quantize
    gathers: list[str] = field(default_factory=list)      # "all": tables the quantizer takes
    exclude: list[str] = field(default_factory=list)
    shared: dict[str, str] = field(default_factory=dict)  # MatMul → output of the one
                                                          # quantizing its W
    ties: dict[str, str] = field(default_factory=dict)    # embedding Gather → head's output


@overload
def quantize(model: onnx.ModelProto | str | os.PathLike[str], bits: int = 4, block: int = 32,
             accuracy_level: int | None = None, keep: Collection[str] = (), *,
             method: str = "default", symmetric: bool = True,
             embeddings: str = "tied") -> onnx.ModelProto: ...


@overload
def quantize(model: ir.Model, bits: int = 4, block: int = 32,
             accuracy_level: int | None = None, keep: Collection[str] = (), *,
             method: str = "default", symmetric: bool = True,
             embeddings: str = "tied") -> ir.Model: ...


def quantize(model: Any, bits: int = 4, block: int = 32, accuracy_level: int | None = None,
             keep: Collection[str] = (), *, method: str = "default", symmetric: bool = True,
             embeddings: str = "tied") -> Any:
    """``model`` with its base MatMuls as MatMulNBits (``bits`` 4 or 8, blocks of ``block``
    rows), LoRA inputs and ``keep`` untouched, embeddings per ``embeddings`` (see the module).
    Returns an ``onnx_ir.Model`` for one, else an ``onnx.ModelProto``."""
    _check(bits, block, accuracy_level, method, embeddings)
    proto = _load(model)
    graph = proto.graph
    _name_nodes(graph)
    kept = {i.name for i in graph.input} | set(keep)
    kept |= {t.name for t in graph.initializer if t.name.endswith((A_SUFFIX, B_SUFFIX))}
    _expose_gemms(graph, kept)
    heads = _expose_transposed(graph, kept)
    tie_ok = bits == 4 and method == "default" and symmetric and embeddings != "none"
    plan = _plan(graph, kept, heads, tie_ok, embeddings == "all")
    MatMulNBitsQuantizer = _quantizer().MatMulNBitsQuantizer  # noqa: N806 - its own name

    ops = ("MatMul", "Gather") if plan.gathers else ("MatMul",)
    if plan.gathers:
        _int4_opset(proto)
    with _quiet():
        quantizer = MatMulNBitsQuantizer(
            proto, bits=bits, block_size=block, is_symmetric=symmetric,
            accuracy_level=accuracy_level, nodes_to_exclude=plan.exclude,
            op_types_to_quantize=ops,
            algo_config=_algo(method, bits, block, symmetric, accuracy_level, ops, plan))
        quantizer.process()
    out: onnx.ModelProto = quantizer.model.model
    _share(out.graph, plan.shared, bits)
    for gather, head in plan.ties.items():
        _tie(out.graph, gather, head, bits, block)
    _drop_unused(out.graph)
    if not any(o.domain == _MS for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(_MS, 1))
    return ir.from_proto(out) if isinstance(model, ir.Model) else out


def quantize_file(src: str | os.PathLike[str], dst: str | os.PathLike[str] | None = None,
                  **options: Any) -> Path:
    """Quantize the file ``src`` (``quantize``'s options) into ``dst`` (default: ``src``
    itself, replaced atomically); external data past ``EXTERNAL_DATA_BYTES``. Returns ``dst``."""

    target = Path(dst if dst is not None else src)
    quantized = quantize(Path(src), **options)
    save_program(SimpleNamespace(model=ir.from_proto(quantized)), target)
    return target


def _check(bits: int, block: int, accuracy_level: int | None, method: str,
           embeddings: str) -> None:
    if bits not in (4, 8):
        raise LoraFxError(f"--dtype int{bits} is not supported: quantize to int4 or int8")
    if block not in BLOCKS:
        raise LoraFxError(f"--quant-block {block} is not supported: MatMulNBits takes "
                          f"{', '.join(map(str, BLOCKS))}")
    if accuracy_level is not None and accuracy_level not in range(5):
        raise LoraFxError(f"accuracy level {accuracy_level} is not one of ONNX Runtime's 0-4 "
                          "(0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8)")
    if method not in METHODS:
        raise LoraFxError(f"quantization method {method!r} is unknown: use one of "
                          f"{', '.join(METHODS)}")
    if method == "hqq" and bits != 4:
        raise LoraFxError("HQQ writes float zero points, which ONNX Runtime's MatMulNBits runs "
                          "at 4 bits only: use --dtype int4, or another method for int8")
    if embeddings not in EMBEDDINGS:
        raise LoraFxError(f"embeddings={embeddings!r}: use one of {', '.join(EMBEDDINGS)}")
    if embeddings == "all" and (bits != 4 or method != "default"):
        raise LoraFxError("quantized embedding tables (embeddings='all') are int4 with the "
                          f"'default' method only, not int{bits} / {method!r}: use "
                          "embeddings='tied' to keep untied tables float")


def _load(model: Any) -> onnx.ModelProto:
    """A private ModelProto of ``model`` with every weight in memory."""
    if isinstance(model, ir.Model):
        proto = ir.to_proto(model)
    elif isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    else:
        path = Path(model)
        if not path.is_file():
            raise LoraFxError(f"{path} is not an ONNX file: pass the exported model.onnx")
        proto = onnx.load(str(path))
    outside = [t.name for t in proto.graph.initializer
               if t.data_location == TensorProto.EXTERNAL]
    if outside:
        raise LoraFxError(f"{len(outside)} weights of the model are external data not loaded "
                          f"(e.g. {outside[0]}): pass the file's path to quantize, or "
                          "onnx.load it with its external data")
    return proto


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of its subgraphs."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from _nodes(sub)


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give unnamed nodes unique names (the quantizer excludes nodes by name)."""
    taken = {n.name for n in _nodes(graph)}
    count = 0
    for node in _nodes(graph):
        if not node.name:
            while f"lorafx_q{count}" in taken:
                count += 1
            node.name = f"lorafx_q{count}"
            taken.add(node.name)


def _constants(graph: onnx.GraphProto, kept: set[str]) -> dict[str, TensorProto]:
    """Float 2-D initializers that may be quantized."""
    return {t.name: t for t in graph.initializer
            if t.name not in kept and t.data_type in _FLOATS and len(t.dims) == 2}


def _expose_gemms(graph: onnx.GraphProto, kept: set[str]) -> None:
    """A linear on 2-D inputs exports as ``Gemm(x, W, b, transB=1)`` (y = x·Wᵀ + b); the
    quantizer takes MatMuls only, so each such Gemm with a constant W becomes
    ``Add(MatMul(x, Wᵀ), b)`` (alpha = beta = 1, transA = 0 only; Wᵀ written out once)."""
    consts = _constants(graph, kept)
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    made: dict[str, str] = {}
    for node in list(graph.node):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Gemm" or node.input[1] not in consts or attrs.get("transA", 0) or \
                attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            continue
        weight = node.input[1]
        if attrs.get("transB", 0) and weight not in made:
            made[weight] = _free(f"{weight}.T", taken)
            array = numpy_helper.to_array(consts[weight])
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array.T),
                                                             made[weight]))
        b = made[weight] if attrs.get("transB", 0) else weight
        bias = len(node.input) > 2 and node.input[2] != ""
        product = _free(f"{node.output[0]}_matmul", taken) if bias else node.output[0]
        new = [helper.make_node("MatMul", [node.input[0], b], [product], name=node.name)]
        if bias:
            new.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]],
                                        name=_free(f"{node.name}/bias", taken)))
        at = list(graph.node).index(node)
        graph.node.remove(node)
        for k, n in enumerate(new):
            graph.node.insert(at + k, n)


def _expose_transposed(graph: onnx.GraphProto, kept: set[str]) -> dict[str, str]:
    """MatMuls reading ``Transpose(W)`` of a constant W [a, b] read a new constant Wᵀ instead
    (the Transpose dropped when nothing else reads it). Returns {Wᵀ's name: W's name}."""
    consts = _constants(graph, kept)
    producer = {o: n for n in graph.node for o in n.output}
    made: dict[str, str] = {}          # Transpose output → the new initializer
    taken = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        t = producer.get(node.input[1])
        perm = [list(a.ints) for a in t.attribute if a.name == "perm"] if t is not None else []
        if t is None or t.op_type != "Transpose" or t.input[0] not in consts or \
                perm not in ([], [[1, 0]]):
            continue
        if t.output[0] not in made:
            name = _free(f"{t.input[0]}.T", taken)
            array = numpy_helper.to_array(consts[t.input[0]])
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array.T),
                                                             name))
            made[t.output[0]] = name
        node.input[1] = made[t.output[0]]
    read = {i for n in _nodes(graph) for i in n.input} | {o.name for o in graph.output}
    dead = [n for n in graph.node if n.op_type == "Transpose" and n.output[0] in made
            and n.output[0] not in read]
    for n in dead:
        graph.node.remove(n)
    return {name: producer[out].input[0] for out, name in made.items()}


def _free(name: str, taken: set[str]) -> str:
    out, k = name, 0
    while out in taken:
        k += 1
        out = f"{name}{k}"
    taken.add(out)
    return out


def _plan(graph: onnx.GraphProto, kept: set[str], heads: dict[str, str], tie_ok: bool,
          gather_all: bool) -> _Plan:
    """Select the base MatMuls (one per weight: later readers share it), the tied tables and,
    with ``gather_all``, the other float tables; exclude every other MatMul and Gather."""
    consts = _constants(graph, kept)
    plan = _Plan()
    first: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in consts:
            weight = node.input[1]
            if weight in first:
                plan.shared[node.name] = first[weight].output[0]
            else:
                first[weight] = node
                plan.matmuls.append(node.name)
    for node in graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.op_type != "Gather" or node.input[0] not in consts or axis != 0:
            continue
        head = _head_of(node.input[0], first, heads, consts) if tie_ok else None
        if head is not None:
            plan.ties[node.name] = head.output[0]
        elif gather_all:
            plan.gathers.append(node.name)
    chosen = set(plan.matmuls) | set(plan.gathers)
    plan.exclude = [n.name for n in _nodes(graph)
                    if n.op_type in ("MatMul", "Gather") and n.name not in chosen]
    return plan


def _head_of(table: str, first: dict[str, onnx.NodeProto], heads: dict[str, str],
             consts: dict[str, TensorProto]) -> onnx.NodeProto | None:
    """The MatMul whose weight is ``table`` transposed (the export's Transpose, or equal
    values), or None."""
    e = consts[table]
    for weight, node in first.items():
        if heads.get(weight) == table:
            return node
    values: np.ndarray | None = None
    for weight, node in first.items():
        w = consts[weight]
        if list(w.dims) == list(e.dims)[::-1] and w.data_type == e.data_type:
            values = numpy_helper.to_array(e) if values is None else values
            if np.array_equal(numpy_helper.to_array(w), values.T):
                return node
    return None


def _int4_opset(model: onnx.ModelProto) -> None:
    """Raise the default opset to 21 (int4 element types, which the quantized tables use), as
    the quantizer would with a warning that the file may be invalid: 21 changed no operator an
    export holds except GroupNormalization (per-channel scale), refused."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < 21:
            if any(n.op_type == "GroupNormalization" for n in _nodes(model.graph)):
                raise LoraFxError("quantized embedding tables need opset 21, which changed "
                                  "GroupNormalization that this model uses: use "
                                  "embeddings='tied' or export with --opset 21")
            opset.version = 21
    model.ir_version = max(model.ir_version, 10)


def _algo(method: str, bits: int, block: int, symmetric: bool, accuracy_level: int | None,
          ops: tuple[str, ...], plan: _Plan) -> Any:
    """The quantizer's algorithm config for ``method``."""
    q = _quantizer()
    if method == "default":
        return q.DefaultWeightOnlyQuantConfig(
            block_size=block, is_symmetric=symmetric, accuracy_level=accuracy_level,
            op_types_to_quantize=ops, bits=bits)
    if method == "hqq":
        return q.HQQWeightOnlyQuantConfig(block_size=block, bits=bits,
                                          op_types_to_quantize=("MatMul",))
    # RTN and k-quant fill in 4 bits for every MatMul without a per-node entry
    widths = {name: {"bits": bits} for name in plan.matmuls}
    config = q.RTNWeightOnlyQuantConfig if method == "rtn" else q.KQuantWeightOnlyQuantConfig
    return config(op_types_to_quantize=("MatMul",), customized_weight_config=widths)


def _quantizer() -> Any:
    """ONNX Runtime's ``matmul_nbits_quantizer`` module (deferred: heavy). Importing it calls
    ``logging.basicConfig(level=INFO)``, which would print every library's INFO records
    (onnx_ir's passes...) for the rest of the process: the root logger is given back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    root.handlers[:] = handlers
    root.setLevel(level)
    return matmul_nbits_quantizer


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantizer logs every node at INFO and RTN prints a progress bar on stdout (a
    ``--json`` stdout must stay clean): silenced for the call."""
    names = [n for n in logging.root.manager.loggerDict
             if n.startswith(("onnxruntime.quantization", "neural_compressor"))]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            # HQQ hands torch a read-only numpy weight (it only reads it)
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            # a zero block (a padding row) divides 0 / 0 before np.where picks 0
            warnings.filterwarnings("ignore", "invalid value encountered in divide")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _replacement(graph: onnx.GraphProto, output: str) -> onnx.NodeProto | None:
    """The MatMulNBits that took over the MatMul whose output was ``output``."""
    return next((n for n in graph.node if n.op_type == "MatMulNBits"
                 and n.output[0] in (output, output + "_pre_reshape")), None)


def _share(graph: onnx.GraphProto, shared: dict[str, str], bits: int) -> None:
    """Each MatMul whose weight another MatMul quantized (the one that wrote ``shared[name]``)
    reads the same blocks: one int4 copy per weight (the quantizer would write a second under
    the same name)."""
    for name, first in shared.items():
        node = next((n for n in graph.node if n.name == name and n.op_type == "MatMul"), None)
        q = _replacement(graph, first)
        if node is None or q is None or q.output[0] != first:
            continue  # not quantized, or through a reshape: this reader stays float
        new = helper.make_node("MatMulNBits", [node.input[0], *q.input[1:]], list(node.output),
                               name=f"{name}_Q{bits}", domain=_MS)
        new.attribute.extend(q.attribute)
        graph.node.insert(list(graph.node).index(node), new)
        graph.node.remove(node)


def _tie(graph: onnx.GraphProto, gather: str, head: str, bits: int, block: int) -> None:
    """Replace the embedding Gather by GatherBlockQuantized over the blocks of the head (the
    MatMul that wrote ``head``; module docstring); left float when the head was not quantized
    as expected (symmetric 2-D blocks: inputs x, Q, s)."""
    g = next((n for n in graph.node if n.name == gather), None)
    inits = {t.name: t for t in graph.initializer}
    q = _replacement(graph, head)
    if g is None or q is None or q.output[0] != head or len(q.input) != 3 or \
            q.input[1] not in inits:
        return
    vocab, k_blocks, blob = inits[q.input[1]].dims
    hidden = next(a.i for a in q.attribute if a.name == "K")
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    shape = _free(f"{gather}/packed_shape", taken)
    graph.initializer.append(numpy_helper.from_array(
        np.array([vocab, k_blocks * blob], dtype=np.int64), shape))
    packed, padded = _free(f"{gather}/packed", taken), k_blocks * block != hidden
    out = _free(f"{gather}/padded", taken) if padded else g.output[0]
    new = [helper.make_node("Reshape", [q.input[1], shape], [packed], name=f"{gather}/Reshape"),
           helper.make_node("GatherBlockQuantized", [packed, g.input[1], q.input[2]], [out],
                            name=f"{gather}/GatherBlockQuantized", domain=_MS, bits=bits,
                            block_size=block, gather_axis=0, quantize_axis=1)]
    if padded:
        ends = {k: _free(f"{gather}/{k}", taken) for k in ("start", "end", "axis")}
        for key, value in zip(ends, (0, hidden, -1), strict=True):
            graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64),
                                                             ends[key]))
        new.append(helper.make_node("Slice", [out, *ends.values()], [g.output[0]],
                                    name=f"{gather}/Slice"))
    at = list(graph.node).index(g)
    graph.node.remove(g)
    for k, n in enumerate(new):
        graph.node.insert(at + k, n)


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove initializers nothing reads (a tied table now read as the head's blocks)."""
    read = {i for n in _nodes(graph) for i in n.input}
    read |= {o.name for o in graph.output} | {i.name for i in graph.input}
    unused = [t for t in graph.initializer if t.name not in read]
    for t in unused:
        graph.initializer.remove(t)
