"""The package's floor plan, checked from the code's own imports (parsed with `ast`).

1. Layers point down: a module imports only its own layer or lower ones (LAYERS below, top to
   bottom; a module is placed by the longest matching prefix; a module in no layer fails, so a
   new module must be placed here).
2. No import circles between modules (strongly connected components of the import graph).
3. No dataset name compared as a string outside `cir_cli/data/`: a dataset owns its protocol.

Every `import` / `from ... import` counts, at module level or inside a function, absolute or
relative, except those under `if TYPE_CHECKING:` (they never run). Imports by string
(`importlib.import_module`, the method registry's "module:Class" entries) are not edges.
The checkers are plain functions, tested on a small synthetic package at the bottom of this file.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "cir_cli"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / PACKAGE

# Top to bottom. Each entry is a dotted module prefix: "cir_cli.engine" places cir_cli.engine and
# every module below it. The package's own __init__ (exactly "cir_cli") is placed by ROOT_LAYER.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("cli", ("cir_cli.cli", "cir_cli.__main__")),
    ("workflows", (
        "cir_cli.workflows", "cir_cli.api", "cir_cli.preflight", "cir_cli.search",
        "cir_cli.report", "cir_cli.demo", "cir_cli.run_table",
    )),
    ("methods", ("cir_cli.methods",)),
    ("engine", ("cir_cli.engine", "cir_cli.backbones", "cir_cli.modules", "cir_cli.evaluation")),
    ("data", (
        "cir_cli.data", "cir_cli.cache", "cir_cli.checkpoints", "cir_cli.weights", "cir_cli.runs",
        "cir_cli.candidates", "cir_cli.recipes", "cir_cli.config",
    )),
    ("base", (
        "cir_cli.metrics", "cir_cli.ranking", "cir_cli.io", "cir_cli.errors", "cir_cli.progress",
        "cir_cli.submission", "cir_cli.registry",
    )),
]
ROOT_LAYER = "base"

# Spellings of dataset names that are not registry keys but name a dataset all the same.
DATASET_ALIASES = ("fiq",)
# Where dataset names may be compared: the datasets' own package.
DATASET_HOME = "cir_cli.data"


def registered_dataset_names() -> set[str]:
    """The dataset registry's names (the one place to update if the registry moves)."""
    import cir_cli.data as data

    registry = getattr(data, "DATASETS", None)
    if registry is None:  # a registry behind a function
        registry = data.dataset_names() if hasattr(data, "dataset_names") else data.datasets()
    return set(registry) | set(DATASET_ALIASES)


# -- the import graph ------------------------------------------------------------------------


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int

    def __str__(self) -> str:
        return f"{self.source}:{self.line} -> {self.target}"


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    root = package_dir.parent
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import node that can run: all but the bodies of `if TYPE_CHECKING:`."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


@functools.cache
def import_graph(package_dir: Path) -> tuple[set[str], list[Edge]]:
    """(modules, edges) of the package; edges point at the package's own modules only.

    `from a.b import c` points at a.b.c when that is a module, else at a.b (c is a name in it).
    """
    files = module_files(package_dir)
    modules = set(files)
    top = package_dir.name
    edges: list[Edge] = []
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _runtime_imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    # The package a relative import starts from: the module's own package.
                    here = name.split(".") if is_pkg else name.split(".")[:-1]
                    base_parts = here[: len(here) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                if target != top and not target.startswith(top + "."):
                    continue
                # `import a.b.c` where only a.b exists (c a name): point at the longest module.
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != name:
                    edges.append(Edge(name, target, node.lineno))
    # Cached: the real package is parsed once for all tests (callers must not mutate these).
    return modules, sorted(set(edges), key=lambda e: (e.source, e.line, e.target))


# -- layers ------------------------------------------------------------------------------------


def layer_of(
    module: str, layers: Sequence[tuple[str, Sequence[str]]], root: str, root_layer: str
) -> tuple[int, str] | None:
    """(rank, name) of the layer whose longest prefix matches `module` (rank 0 = top)."""
    if module == root:
        names = [n for n, _ in layers]
        return names.index(root_layer), root_layer
    best: tuple[int, int, str] | None = None
    for rank, (layer, prefixes) in enumerate(layers):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > best[1]
            ):
                best = (rank, len(prefix), layer)
    return None if best is None else (best[0], best[2])


def unplaced_modules(
    modules: Iterable[str], layers: Sequence[tuple[str, Sequence[str]]], root: str,
    root_layer: str,
) -> list[str]:
    return sorted(m for m in modules if layer_of(m, layers, root, root_layer) is None)


def upward_imports(
    edges: Iterable[Edge], layers: Sequence[tuple[str, Sequence[str]]], root: str,
    root_layer: str,
) -> list[str]:
    """One line per import that points at a higher layer than its module's."""
    out = []
    for edge in edges:
        src = layer_of(edge.source, layers, root, root_layer)
        dst = layer_of(edge.target, layers, root, root_layer)
        if src is not None and dst is not None and dst[0] < src[0]:
            out.append(
                f"{edge.source} ({src[1]}) line {edge.line} imports {edge.target} ({dst[1]})"
            )
    return out


# -- circles -----------------------------------------------------------------------------------


def strongly_connected(nodes: Iterable[str], edges: Iterable[Edge]) -> list[list[str]]:
    """Tarjan's SCCs with more than one module (a module never imports itself here)."""
    graph: dict[str, list[str]] = {n: [] for n in nodes}
    for e in edges:
        graph.setdefault(e.source, []).append(e.target)
        graph.setdefault(e.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        # Iterative DFS: (node, iterator over its successors).
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return sorted(out)


def one_cycle(component: Sequence[str], edges: Iterable[Edge]) -> list[Edge]:
    """A shortest import cycle through the component's first module (edges with lines)."""
    members = set(component)
    by_source: dict[str, list[Edge]] = {}
    for e in edges:
        if e.source in members and e.target in members:
            by_source.setdefault(e.source, []).append(e)
    start = component[0]
    # Breadth-first from start back to start.
    paths: dict[str, list[Edge]] = {start: []}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for e in by_source.get(node, []):
                if e.target == start:
                    return [*paths[node], e]
                if e.target not in paths:
                    paths[e.target] = [*paths[node], e]
                    nxt_frontier.append(e.target)
        frontier = nxt_frontier
    return []


def import_cycles(modules: Iterable[str], edges: Sequence[Edge]) -> list[str]:
    lines = []
    for component in strongly_connected(modules, edges):
        cycle = one_cycle(component, edges)
        lines.append(
            f"circle among {', '.join(component)}: " + "; ".join(str(e) for e in cycle)
        )
    return lines


# -- dataset names -----------------------------------------------------------------------------


def _string_constants(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return [e.value for e in node.elts if isinstance(e, ast.Constant)
                and isinstance(e.value, str)]
    return []


def dataset_name_comparisons(
    package_dir: Path, names: set[str], home: str
) -> list[str]:
    """`x == "cirr"`, `x != "fiq"`, `x in ("cirr", ...)`, `case "cirr":` outside `home`."""
    out = []
    for module, path in module_files(package_dir).items():
        if module == home or module.startswith(home + "."):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        rel = path.relative_to(package_dir.parent)
        for node in ast.walk(tree):
            found: list[str] = []
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                for op, left, right in zip(node.ops, operands[:-1], operands[1:], strict=True):
                    if isinstance(op, ast.Eq | ast.NotEq | ast.Is | ast.IsNot):
                        for side in (left, right):
                            if isinstance(side, ast.Constant):
                                found += _string_constants(side)
                    elif isinstance(op, ast.In | ast.NotIn) and isinstance(
                        right, ast.Tuple | ast.List | ast.Set
                    ):
                        found += _string_constants(right)
            elif isinstance(node, ast.MatchValue):
                found += _string_constants(node.value)
            hits = sorted({s for s in found if s in names})
            if hits:
                out.append(f"{rel}:{node.lineno} compares against {', '.join(hits)}")
    return sorted(set(out), key=lambda s: (s.split(":")[0], int(s.split(":")[1].split()[0]), s))


# -- the tests on the real package -------------------------------------------------------------


def test_every_module_is_placed_in_a_layer() -> None:
    modules, _ = import_graph(PACKAGE_DIR)
    missing = unplaced_modules(modules, LAYERS, PACKAGE, ROOT_LAYER)
    assert not missing, (
        "modules in no layer (add them to LAYERS in tests/test_architecture.py): "
        + ", ".join(missing)
    )


def test_every_layer_entry_names_a_module() -> None:
    # A stale entry (a module that moved) would place nothing and hide a misplaced newcomer.
    modules, _ = import_graph(PACKAGE_DIR)
    stale = [
        prefix
        for _, prefixes in LAYERS
        for prefix in prefixes
        if not any(m == prefix or m.startswith(prefix + ".") for m in modules)
    ]
    assert not stale, "LAYERS entries that match no module: " + ", ".join(stale)


def test_no_import_points_to_a_higher_layer() -> None:
    modules, edges = import_graph(PACKAGE_DIR)
    upward = upward_imports(edges, LAYERS, PACKAGE, ROOT_LAYER)
    assert not upward, "imports that point upward:\n" + "\n".join(upward)


def test_no_import_circles() -> None:
    modules, edges = import_graph(PACKAGE_DIR)
    cycles = import_cycles(modules, edges)
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_no_dataset_name_is_compared_outside_the_data_package() -> None:
    names = registered_dataset_names()
    assert {"cirr", "fashioniq"} <= names  # the registry was read, not an empty set
    hits = dataset_name_comparisons(PACKAGE_DIR, names, DATASET_HOME)
    assert not hits, (
        "dataset names branched on outside cir_cli/data/ (move the decision into the "
        "dataset's spec):\n" + "\n".join(hits)
    )


# -- the checkers themselves, on a synthetic package --------------------------------------------

TOY_LAYERS = [
    ("top", ("pkg.app",)),
    ("middle", ("pkg.engine",)),
    ("bottom", ("pkg.util", "pkg.engine.low")),  # longest prefix wins: engine.low is bottom
]


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


CLEAN = {
    "__init__.py": "",
    "app.py": "from pkg.engine import run\nfrom . import util\n",
    "engine/__init__.py": "from .low import helper\n\ndef run():\n    from pkg.util import x\n",
    "engine/low.py": "import pkg.util\n",
    "util.py": (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pkg.app import App\n"
        "x = 1\nNAME = 'cirr' if x else 'other'\n"
    ),
}


def test_checker_passes_a_clean_package(tmp_path: Path) -> None:
    pkg = _write(tmp_path, CLEAN)
    modules, edges = import_graph(pkg)
    assert modules == {"pkg", "pkg.app", "pkg.engine", "pkg.engine.low", "pkg.util"}
    assert {(e.source, e.target) for e in edges} == {
        ("pkg.app", "pkg.engine"), ("pkg.app", "pkg.util"), ("pkg.engine", "pkg.engine.low"),
        ("pkg.engine", "pkg.util"), ("pkg.engine.low", "pkg.util"),
    }  # the TYPE_CHECKING import of pkg.app is not an edge
    assert unplaced_modules(modules, TOY_LAYERS, "pkg", "bottom") == []
    assert upward_imports(edges, TOY_LAYERS, "pkg", "bottom") == []
    assert import_cycles(modules, edges) == []
    assert dataset_name_comparisons(pkg, {"cirr", "fiq"}, "pkg.data") == []


def test_checker_reports_upward_imports_circles_unplaced_modules_and_names(
    tmp_path: Path,
) -> None:
    files = dict(CLEAN)
    # An upward import inside a function (still an edge), relative, two levels up.
    files["engine/low.py"] = "def f():\n    from ..app import main\n"
    # A circle util -> engine -> util (engine imports util in CLEAN), and a stray module.
    files["util.py"] = "import pkg.engine\n"
    files["stray.py"] = (
        "def g(d, s):\n"
        "    if d == 'cirr' or 'fiq' != s or d in ('x', 'cirr'):\n        return 1\n"
        "    match d:\n        case 'fiq':\n            return 2\n"
        "    return d.startswith('cirr')\n"  # not a comparison
    )
    files["data/__init__.py"] = "def h(d):\n    return d == 'cirr'\n"  # the data package may
    pkg = _write(tmp_path, files)
    modules, edges = import_graph(pkg)
    assert unplaced_modules(modules, TOY_LAYERS + [("data", ())], "pkg", "bottom") == [
        "pkg.data", "pkg.stray"
    ]
    upward = upward_imports(edges, TOY_LAYERS, "pkg", "bottom")
    assert upward == [
        "pkg.engine.low (bottom) line 2 imports pkg.app (top)",
        "pkg.util (bottom) line 1 imports pkg.engine (middle)",
    ]
    cycles = import_cycles(modules, edges)
    assert len(cycles) == 1
    assert cycles[0].startswith("circle among pkg.app, pkg.engine, pkg.engine.low, pkg.util:")
    assert "pkg.engine.low:2 -> pkg.app" in cycles[0]
    hits = dataset_name_comparisons(pkg, {"cirr", "fiq"}, "pkg.data")
    assert hits == [
        "pkg/stray.py:2 compares against cirr",
        "pkg/stray.py:2 compares against fiq",
        "pkg/stray.py:5 compares against fiq",
    ]
