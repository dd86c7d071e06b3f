"""lora_fx's import structure, read from its source with ``ast``: no cycle among the module-level
imports of its modules, none among its packages either, no import inside a function except an
allowed deferred optional dependency, and every module importable alone in a fresh interpreter.

The graph: a node per module (a package's ``__init__`` is the package's node); an edge for each
module-level import of a lora_fx module, relative imports resolved, ``from pkg import name``
counted as an import of ``pkg.name`` where that is a submodule, else of ``pkg``. Imports under
``if TYPE_CHECKING:`` never run and are left out. The package graph collapses it to lora_fx's
parts (``lora_fx.onnx.verify`` → ``lora_fx.onnx``; a top-level module such as
``lora_fx.deploy_format`` is its own part): an edge A → B for any import of a module of B in a
module of A, so that layers keep one direction (``lora_fx.onnx`` may import ``lora_fx.ort``,
never the reverse: what both need lives in ``lora_fx.deploy_format``).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

# Not tests.helpers.ROOT: helpers imports lora_fx, and these checks must run (and say why) when
# a cycle keeps lora_fx from importing at all.
ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "lora_fx"
# Function-level imports allowed, by imported module (a prefix: "matplotlib" allows
# "matplotlib.figure"): heavy optional dependencies, deferred on purpose.
OPTIONAL = ("transformers", "matplotlib", "onnxruntime.transformers", "onnxruntime_genai",
            "onnxruntime.quantization",
            "onnxscript.rewriter.ort_fusions")  # private _core: onnx.fuse skips if it is gone
# The facade's exports (export_onnx, export_kv, ...) import their lora_fx.onnx module on first
# use, so that ``import lora_fx`` loads no onnx / onnxscript: (importer, imported package).
FACADE = ("lora_fx.api", "lora_fx.onnx")
# The other function-level imports allowed, each by (importer, imported module).
DEFERRED: set[tuple[str, str]] = set()  # (module, import) pairs deferred on purpose, with why


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    line: int
    function: str | None  # the enclosing function, None at module level

    def where(self, root: Path) -> str:
        return f"{self.importer} ({_file_of(root, self.importer)}:{self.line})"


def module_names(root: Path) -> dict[str, Path]:
    """{dotted name: file} of every module under the package directory ``root``."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _file_of(root: Path, module: str) -> str:
    path = module_names(root)[module]
    return str(path.relative_to(root.parent))


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module of ``from <node.module> import ...`` written in ``importer``."""
    if node.level == 0:
        return node.module or ""
    parts = importer.split(".")
    base = parts if is_package else parts[:-1]  # a package's __init__ is its own package
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Collector(ast.NodeVisitor):
    """Every executed import statement of one module, with its enclosing function if any."""

    def __init__(self, importer: str, is_package: bool, known: set[str]) -> None:
        self.importer, self.is_package, self.known = importer, is_package, known
        self.function: str | None = None
        self.found: list[Import] = []

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        outer, self.function = self.function, self.function or node.name
        self.generic_visit(node)
        self.function = outer

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):  # never runs: only its else branch counts
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def _add(self, target: str, line: int) -> None:
        self.found.append(Import(self.importer, target, line, self.function))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve(self.importer, self.is_package, node)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(sub if sub in self.known else base, node.lineno)


def imports(root: Path) -> list[Import]:
    """Every executed import in the package at ``root``."""
    names = module_names(root)
    found = []
    for name, path in names.items():
        collector = _Collector(name, path.name == "__init__.py", set(names))
        collector.visit(ast.parse(path.read_text(), filename=str(path)))
        found += collector.found
    return found


def _ours(target: str) -> bool:
    return target == PACKAGE or target.startswith(PACKAGE + ".")


def import_graph(found: list[Import]) -> nx.DiGraph:
    """Module-level imports between lora_fx modules; each edge keeps its first Import."""
    graph = nx.DiGraph()
    for imp in found:
        if imp.function is None and _ours(imp.target) and imp.target != imp.importer:
            if not graph.has_edge(imp.importer, imp.target):
                graph.add_edge(imp.importer, imp.target, imp=imp)
    return graph


def part_of(module: str) -> str:
    """The first-level part of lora_fx that ``module`` is in: its subpackage, or itself."""
    return ".".join(module.split(".")[:2])


def package_graph(graph: nx.DiGraph) -> nx.DiGraph:
    """``graph`` collapsed to lora_fx's parts (``part_of``); each edge keeps the first Import,
    by importer and line, of a module of one part by a module of the other."""
    packages = nx.DiGraph()
    for a, b, data in sorted(graph.edges(data=True), key=lambda e: (e[0], e[2]["imp"].line)):
        pa, pb = part_of(a), part_of(b)
        if pa != pb and not packages.has_edge(pa, pb):
            packages.add_edge(pa, pb, imp=data["imp"])
    return packages


def cycles(graph: nx.DiGraph, root: Path) -> list[str]:
    """One cycle per strongly connected component, written out with one import per edge."""
    out = []
    for component in nx.strongly_connected_components(graph):
        if len(component) < 2:
            continue
        edges = nx.find_cycle(graph.subgraph(component))
        steps = [f"{graph.edges[a, b]['imp'].where(root)} imports {graph.edges[a, b]['imp'].target}"
                 for a, b in edges]
        out.append(" -> ".join([edges[0][0], *(b for _, b in edges)]) + ":\n    "
                   + "\n    ".join(steps))
    return sorted(out)


def _allowed_in_function(imp: Import) -> bool:
    if (imp.importer, imp.target) in DEFERRED:
        return True
    if imp.importer == FACADE[0] and imp.target.startswith(FACADE[1] + "."):
        return True
    return not _ours(imp.target) and any(
        imp.target == m or imp.target.startswith(m + ".") for m in OPTIONAL)


def function_imports(found: list[Import], root: Path) -> list[str]:
    """The imports inside function bodies that the allow-lists do not cover."""
    return [f"{imp.where(root)} in {imp.function}(): import {imp.target}"
            for imp in found if imp.function is not None and not _allowed_in_function(imp)]


# --- the library ---------------------------------------------------------------------------
LIBRARY = ROOT / PACKAGE


def test_no_import_cycles() -> None:
    found = cycles(import_graph(imports(LIBRARY)), LIBRARY)
    assert not found, "import cycles in lora_fx:\n" + "\n".join(found)


def test_no_import_cycles_between_packages() -> None:
    """The parts of lora_fx (capture, match, graph, branches, variants, passes, model, adapter,
    onnx, ort, cli, ..., and top-level modules such as config and deploy_format) import each
    other one way: a cycle here means a shared piece belongs in a lower part."""
    found = cycles(package_graph(import_graph(imports(LIBRARY))), LIBRARY)
    assert not found, ("import cycles between lora_fx's packages (move what both sides need to "
                       "the lower one, e.g. lora_fx.deploy_format for onnx and ort):\n"
                       + "\n".join(found))


def test_no_imports_inside_functions_but_deferred_optional_dependencies() -> None:
    deferred = [imp for imp in imports(LIBRARY) if imp.function is not None]
    print("function-level imports:", *(f"{i.where(LIBRARY)}: {i.target}" for i in deferred),
          sep="\n  ")
    bad = function_imports(deferred, LIBRARY)
    assert not bad, ("imports inside functions (move them to the top of the module, or defer "
                     "only a heavy optional dependency and add it to OPTIONAL):\n"
                     + "\n".join(bad))


# Imports the third-party packages lora_fx imports at module level once (argv[1], comma
# separated), then imports each lora_fx module of argv[2:] in a forked child that had imported
# no lora_fx module: import-order bugs inside lora_fx show, at the cost of one interpreter.
# Prints the JSON list of the modules whose import failed (their tracebacks go to stderr).
_DRIVER = """
import importlib, json, os, sys, traceback
for name in filter(None, sys.argv[1].split(",")):
    try:
        importlib.import_module(name)
    except Exception:
        pass  # the child that needs it reports it
failed = []
for name in sys.argv[2:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            print(f"--- import {name}:", file=sys.stderr)
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print(json.dumps(failed))
"""


def _third_party(found: list[Import]) -> list[str]:
    stdlib = set(sys.stdlib_module_names)
    tops = {imp.target.split(".")[0] for imp in found
            if imp.function is None and not _ours(imp.target)}
    return sorted(t for t in tops if t and t not in stdlib and t != "__future__")


def _run_alone(modules: list[str], warm: list[str], where: Path) -> Iterator[tuple[str, str]]:
    """(module, error) for each module that fails to import in a fresh interpreter whose
    ``PYTHONPATH`` and working directory are ``where`` (the folder that holds lora_fx/)."""
    env = dict(os.environ, PYTHONPATH=str(where))
    if hasattr(os, "fork"):
        proc = subprocess.run([sys.executable, "-c", _DRIVER, ",".join(warm), *modules],
                              capture_output=True, text=True, env=env, cwd=where, timeout=900)
        assert proc.returncode == 0, proc.stderr
        for name in json.loads(proc.stdout.strip().splitlines()[-1]):
            yield name, proc.stderr
        return
    for name in modules:  # no fork (Windows): one interpreter per module
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True,
                              text=True, env=env, cwd=where, timeout=300)
        if proc.returncode != 0:
            yield name, proc.stderr


def test_each_module_imports_alone_in_a_fresh_interpreter() -> None:
    found = imports(LIBRARY)
    # lora_fx.__main__ runs the CLI when imported: it is left out
    modules = sorted(m for m in module_names(LIBRARY) if not m.endswith(".__main__"))
    failed = dict(_run_alone(modules, _third_party(found), ROOT))
    assert not failed, f"modules that fail to import alone: {sorted(failed)}\n" + next(
        iter(failed.values()))


# --- the checks themselves, on planted faults ------------------------------------------------
def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / PACKAGE
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_checks_catch_planted_faults(tmp_path: Path) -> None:
    """A cycle through a relative ``from . import`` of a submodule, one through a package
    ``__init__``, a lora_fx import and a non-optional import inside functions; a
    TYPE_CHECKING import and an allowed optional one are not faults."""
    root = _package(tmp_path, {
        "__init__.py": "from .a import f\n",
        "a.py": "from .sub import helper\n\ndef f():\n    import json\n    return json\n",
        "sub/__init__.py": "from .deep import helper\n",
        "sub/deep.py": "from lora_fx import a\n",  # deep -> a -> sub -> deep
        "b.py": "from . import c\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import b\n"
                "import lora_fx.d\n",
        "d.py": "def g():\n    from lora_fx import b\n    import matplotlib.pyplot\n"
                "    return b, matplotlib\n",
    })
    found = imports(root)
    graph = import_graph(found)
    assert graph.has_edge("lora_fx.sub.deep", "lora_fx.a")  # from pkg import <submodule>
    assert graph.has_edge("lora_fx.a", "lora_fx.sub")       # from .sub import <name>
    assert not graph.has_edge("lora_fx.c", "lora_fx.b")     # TYPE_CHECKING only
    found_cycles = cycles(graph, root)
    assert len(found_cycles) == 1, found_cycles
    assert {"lora_fx.a", "lora_fx.sub", "lora_fx.sub.deep"} <= set(
        found_cycles[0].split(":")[0].split(" -> "))
    assert "lora_fx/sub/deep.py:1" in found_cycles[0]
    bad = function_imports(found, root)
    assert len(bad) == 2 and "in f(): import json" in bad[0] and "import lora_fx.b" in bad[1]


def test_package_check_catches_a_cycle_no_module_cycle_shows(tmp_path: Path) -> None:
    """p.a imports q.b and q.c imports p.d: no module cycle, a package cycle p -> q -> p,
    reported with the file and line of one import per edge; a top-level module is a part."""
    root = _package(tmp_path, {
        "__init__.py": "",
        "p/__init__.py": "", "p/a.py": "from ..q import b\n", "p/d.py": "from .. import top\n",
        "q/__init__.py": "", "q/b.py": "", "q/c.py": "import json\nfrom lora_fx.p import d\n",
        "top.py": "",
    })
    graph = import_graph(imports(root))
    assert not cycles(graph, root)
    packages = package_graph(graph)
    assert set(packages.edges) == {("lora_fx.p", "lora_fx.q"), ("lora_fx.q", "lora_fx.p"),
                                   ("lora_fx.p", "lora_fx.top")}
    found = cycles(packages, root)
    assert len(found) == 1, found
    assert "lora_fx/p/a.py:1) imports lora_fx.q.b" in found[0]
    assert "lora_fx/q/c.py:2) imports lora_fx.p.d" in found[0]


def test_fresh_interpreter_check_reports_a_broken_module(tmp_path: Path) -> None:
    root = _package(tmp_path, {"__init__.py": "", "ok.py": "import json\n",
                               "broken.py": "from lora_fx.ok import missing\n"})
    failed = dict(_run_alone(["lora_fx.ok", "lora_fx.broken"], [], root.parent))
    assert list(failed) == ["lora_fx.broken"]
    assert "cannot import name 'missing'" in failed["lora_fx.broken"]
