"""Give a captured graph its transformer blocks back as submodules (for FSDP2 per block).

A capture inlines the model's blocks into one graph: the root's forward is the only one that
runs, so ``fully_shard`` can only group the whole model. This pass cuts the graph at block
boundaries: the nodes recorded under one block (``nn_module_stack``: the outermost module
whose path ends in ``.<index>``, e.g. ``model.layers.3``; nodes without a module that lie
between two nodes of the same block belong to it, those between two blocks to the earlier
one) become a ``block_<i>`` GraphModule, called from the top graph with what the block reads
from outside and returning what the outside reads from it:

    y₁, …, y_m = block_i(x₁, …, x_n)

Weights (``get_attr``) read only inside one block, and the modules it calls (its LoRA
branches, dropout), move into it; a weight read by several blocks or by the top graph (a tied
embedding) stays in the top graph and is passed in. The values computed are unchanged.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable

from torch import fx

from ..errors import LoraFxError
from ..graph.attrs import resolve_attr
from ..graph.portable import PortableGraphModule
from .runner import PassResult

BLOCK_PREFIX = "block_"
_INDEXED = re.compile(r"\.\d+$")


def block_path(node: fx.Node) -> str | None:
    """The outermost module path of ``node``'s stack that ends in ``.<index>``."""
    for value in (node.meta.get("nn_module_stack") or {}).values():
        path = value[0] if isinstance(value, tuple) else str(value)
        if _INDEXED.search(path):
            return str(path)
    return None


def assign_blocks(graph: fx.Graph) -> dict[fx.Node, str]:
    """Node → block path for every computing node inside a block's span (see module doc)."""
    ops = [n for n in graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    marks = [block_path(n) for n in ops]
    out: dict[fx.Node, str] = {}
    last: str | None = None
    for i, node in enumerate(ops):
        mark = marks[i]
        if mark is None and last is not None:
            ahead = next((m for m in marks[i + 1:] if m is not None), None)
            mark = last if ahead is not None else None  # after the last block: top graph
        if mark is not None:
            out[node] = mark
            last = mark
    return out


def _spans(order: list[fx.Node], blocks: dict[fx.Node, str]) -> list[tuple[str, list[fx.Node]]]:
    """Each block's nodes in graph order; refuses a block whose nodes are not contiguous."""
    spans: list[tuple[str, list[fx.Node]]] = []
    for node in order:
        name = blocks.get(node)
        if name is None:
            if spans and spans[-1][0] != "":
                spans.append(("", []))
            continue
        if not spans or spans[-1][0] != name:
            if any(s == name for s, _ in spans):
                raise LoraFxError(f"block {name!r} is computed in pieces (interleaved with "
                                  "other code): it cannot become one submodule")
            spans.append((name, []))
        spans[-1][1].append(node)
    return [(s, nodes) for s, nodes in spans if s]


def _ordered(nodes: Iterable[fx.Node]) -> list[fx.Node]:
    return list(dict.fromkeys(nodes))


def _extract(gm: fx.GraphModule, index: int, nodes: list[fx.Node]) -> fx.GraphModule:
    """Move ``nodes`` (one block, contiguous) into a new submodule ``block_<index>``."""
    inside = set(nodes)
    reads = _ordered(a for n in nodes for a in n.all_input_nodes if a not in inside)
    owned = [a for a in reads if a.op == "get_attr" and all(u in inside for u in a.users)]
    inputs = [a for a in reads if a not in owned]
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    graph, env = fx.Graph(), {}
    for a in inputs:
        env[a] = graph.placeholder(a.name)
        env[a].meta = dict(a.meta)
    for a in owned:
        env[a] = graph.get_attr(str(a.target))
        env[a].meta = dict(a.meta)
    for n in nodes:
        env[n] = graph.node_copy(n, lambda x: env[x])
    graph.output(tuple(env[o] for o in outputs))
    targets = {str(n.target) for n in graph.nodes if n.op in ("get_attr", "call_module")}
    block = PortableGraphModule({t: resolve_attr(gm, t) for t in targets}, graph,
                                f"{BLOCK_PREFIX}{index}")
    _keep_buffers(gm, block, targets)
    name = f"{BLOCK_PREFIX}{index}"
    gm.add_submodule(name, block)
    with gm.graph.inserting_before(nodes[0]):
        call = gm.graph.call_module(name, tuple(inputs))
    last = call
    for i, out in enumerate(outputs):
        with gm.graph.inserting_after(last):
            last = gm.graph.call_function(operator.getitem, (call, i))
        last.meta = dict(out.meta)
        out.replace_all_uses_with(last, delete_user_cb=lambda u: u not in inside)
    for n in reversed(nodes):
        gm.graph.erase_node(n)
    for a in owned:
        gm.graph.erase_node(a)
    return block


def _keep_buffers(gm: fx.GraphModule, block: fx.GraphModule, targets: set[str]) -> None:
    """Register as buffers in ``block`` what were buffers in ``gm`` (a dict root sets plain
    attributes), so that they still follow ``.to()``."""
    buffers = {id(b) for b in gm.buffers()}
    for target in targets:
        value = resolve_attr(block, target)
        if id(value) in buffers:
            *parents, last = target.split(".")
            owner = block.get_submodule(".".join(parents)) if parents else block
            delattr(owner, last)
            owner.register_buffer(last, value)


def split_blocks_pass(gm: fx.GraphModule) -> PassResult:
    """Cut every block's span of ``gm``'s graph into a ``block_<i>`` submodule."""
    order = [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    spans = _spans(order, assign_blocks(gm.graph))
    if len(spans) < 2:
        raise LoraFxError(f"found {len(spans)} transformer block(s) in the graph (modules whose "
                          "path ends in .<index>, e.g. model.layers.0): nothing to shard per "
                          "block; shard the whole model with fully_shard(gm)")
    for i, (_, nodes) in enumerate(spans):
        _extract(gm, i, nodes)
    return PassResult(gm, True, {"blocks": len(spans)})


def block_of(split: fx.GraphModule) -> dict[str, str]:
    """Original attribute path → its path in ``split`` (``block_<i>.<path>``) for everything
    that moved into a block."""
    out: dict[str, str] = {}
    for name, child in split.named_children():
        if name.startswith(BLOCK_PREFIX) and isinstance(child, fx.GraphModule):
            for n in child.graph.nodes:
                if n.op in ("get_attr", "call_module"):
                    out[str(n.target)] = f"{name}.{n.target}"
    return out


def moved_path(paths: dict[str, str], path: str) -> str:
    """``path`` in the split module: itself, or under the block it (or what it holds)
    moved into."""
    if path in paths:
        return paths[path]
    for old, new in paths.items():
        if old.startswith(path + "."):
            return f"{new.split('.')[0]}.{path}"
    return path
