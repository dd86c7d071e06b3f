"""What lorafx does around onnxscript's rewrite rules, which ``torch.onnx.export(optimize=True)``
runs over every exported graph.

The rules are module-level objects of onnxscript's. Both helpers touch only those, and do
nothing when onnxscript's layout is not the one they know (the export then runs as it would
without them).

- ``op_type_first()``: while active, each rule's matcher compares a node's op type and domain
  with the pattern's first output node before anything else. onnxscript's
  ``SimplePatternMatcher`` first sets up a match, and for a pattern with two output nodes
  (``SlicesSplit``) indexes every node of the graph by op type, for every node it is tried on:
  O(rules · n) set-ups and O(n²) indexing for an n-node graph. A node whose op type or domain
  differs from the pattern's output node's can never match, so the rewrites, and the file, are
  the same; only the time changes (benchmarks/README.md has the figures).
- ``forget_rewriter_state()``: drop the last graph the matchers keep a reference to.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

try:  # onnxscript's rewriter layout; without it no rule is known and nothing is changed
    from onnxscript.rewriter import pattern
except ImportError:  # pragma: no cover - another onnxscript layout
    pattern = None  # type: ignore[assignment]

# what the exporter's optimizer imports: rules are found once these modules are loaded
_RULE_MODULES = ("onnxscript.optimizer", "onnxscript.rewriter.onnx_fusions")


def _rules() -> Iterator[Any]:
    """Every ``RewriteRule`` object held by a loaded onnxscript module (directly, in a list or
    tuple, or in a ``RewriteRuleSet``), each once."""
    if pattern is None:
        return
    seen: set[int] = set()
    for name, mod in list(sys.modules.items()):
        if mod is None or not name.startswith("onnxscript."):
            continue
        for value in list(vars(mod).values()):
            items = value.rules if isinstance(value, pattern.RewriteRuleSet) else \
                value if isinstance(value, (list, tuple)) else (value,)
            for rule in items:
                if isinstance(rule, pattern.RewriteRule) and id(rule) not in seen:
                    seen.add(id(rule))
                    yield rule


@functools.cache
def _op_type_first_class() -> type | None:
    """A ``SimplePatternMatcher`` that rejects a node whose op type or domain differs from the
    pattern's first output node before setting up a match (the check ``NodePattern.matches``
    makes first); everything else is onnxscript's own matching."""
    if pattern is None:
        return None

    class OpTypeFirst(pattern.SimplePatternMatcher):  # type: ignore[misc, valid-type]
        def match(self, model: Any, graph_or_function: Any, node: Any, **kwargs: Any) -> Any:
            outputs = getattr(self.pattern, "output_nodes", None)
            if outputs:
                first = outputs[0]
                if not (first.op.matches(node.op_type) and first.domain.matches(node.domain)):
                    return pattern.MatchResult().fail(f"OpType mismatch: expected {first.op}, got "
                                              f"{node.domain}.{node.op_type}.")
            return super().match(model, graph_or_function, node, **kwargs)

    return OpTypeFirst


@contextmanager
def op_type_first() -> Iterator[int]:
    """Swap each of onnxscript's rules' plain ``SimplePatternMatcher`` for ``OpTypeFirst`` on the
    same pattern; put the originals back on exit (also on error). Yields how many were swapped.
    Re-entrant: an inner use finds nothing left to swap."""
    for name in _RULE_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    fast = _op_type_first_class()
    swapped: list[tuple[Any, Any]] = []
    if fast is not None:
        for rule in _rules():
            matcher = getattr(rule, "_matcher", None)
            if type(matcher) is pattern.SimplePatternMatcher and hasattr(matcher, "pattern"):
                swapped.append((rule, matcher))
                rule._matcher = fast(matcher.pattern)
    try:
        yield len(swapped)
    finally:
        for rule, matcher in swapped:
            rule._matcher = matcher


def forget_rewriter_state() -> None:
    """Let the last export's graph (and every weight it references) be freed.

    onnxscript's rewrite rules are module-level objects whose matchers keep the last graph they
    matched: after ``torch.onnx.export(optimize=True)`` the whole model stays alive until the
    next export. For a big model that is a second copy held while ONNX Runtime verifies.
    """
    for rule in _rules():
        matcher = getattr(rule, "_matcher", None)
        if isinstance(matcher, pattern.SimplePatternMatcher):
            for attr in ("_graph", "_current_node", "_match"):
                setattr(matcher, attr, None)
