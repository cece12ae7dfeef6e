"""The package's shape, read from the source: layers whose imports point down only, no cycles, small files.

The layer of every module is declared here, once; ``docs/architecture.md`` explains the layers. A new module
must be added to ``LAYERS`` (the test says so), so its place is a decision, not an accident.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tryon_lab"

# lowest first: a module may import its own layer (without cycles) and any layer below, never one above
LAYERS: dict[str, tuple[str, ...]] = {
    "leaves": ("metrics", "timers", "plots"),
    "base": ("checkpoint", "images", "provenance", "oom", "synthetic", "samples", "bulk_read", "import_cache",
             "shards"),
    "parts": ("loading", "embeddings", "teacache", "quant", "compiling", "lora", "memory", "parallel", "jobs",
              "fill_setup", "hotpath", "step_graph", "aot_blocks", "attention", "redux_process"),
    "flow": ("configure", "pipeline", "logos", "flow"),
    "faces": ("widgets", "runs", "notebook"),
    "experiments": ("experiments",),
}
RANK = {name: i for i, name in enumerate(LAYERS)}
MAX_LINES = 400
LONG_ALLOWED = {"tryon_lab.synthetic"}  # the procedural data generator: one drawing recipe, kept in one file


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> str | None:
    """``tryon_lab.runs.verify`` -> the layer of ``runs``; the package itself has none."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    return next((layer for layer, names in LAYERS.items() if parts[1] in names), "undeclared")


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """Every ``tryon_lab`` module this file imports, at the top or inside functions (a lazy import is a dependency too)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def add(name: str) -> None:
        while name and name not in known:  # tryon_lab.x.y where y is a name, not a module
            name = name.rpartition(".")[0]
        if name and name != "tryon_lab":
            found.add(name)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tryon_lab"):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("tryon_lab"):
                continue
            for alias in node.names:  # ``from . import configure`` imports a module; ``from .x import f`` imports x
                sub = f"{target}.{alias.name}"
                add(sub if sub in known else target)
    found.discard(module)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports_of(m, p, known) for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_declared_layer():
    missing = [m for m in modules() if layer_of(m) == "undeclared"]
    assert not missing, f"declare the layer of {missing} in LAYERS (tests/test_architecture.py)"


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_imports_point_down_only():
    upward = []
    for mod, deps in graph().items():
        mine = layer_of(mod)
        for dep in deps:
            theirs = layer_of(dep)
            if theirs in RANK and mine in RANK and RANK[theirs] > RANK[mine]:
                upward.append(f"{mod} ({mine}) imports {dep} ({theirs})")
    assert upward == []


def test_leaves_import_nothing_of_ours():
    g = graph()
    leaves = {m: deps for m, deps in g.items() if layer_of(m) == "leaves"}
    assert all(not deps for deps in leaves.values()), leaves


def test_files_are_small():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES
            and m not in LONG_ALLOWED}
    assert long == {}


def test_nothing_imports_a_script():
    offenders = []
    for folder in ("tryon_lab", "scripts", "tests", "notebooks"):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                if any(n == "scripts" or n.startswith("scripts.") for n in names):
                    offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_no_mock_outside_tests():
    offenders = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if "unittest" in p.read_text()
                 and any(isinstance(n, ast.ImportFrom | ast.Import) and "unittest" in ast.unparse(n)
                         for n in ast.walk(ast.parse(p.read_text())))]
    assert offenders == []


@pytest.mark.parametrize("source, expected", [
    ("from . import configure\n", {"tryon_lab.configure"}),
    ("from .timers import Timings\n", {"tryon_lab.timers"}),
    ("def f():\n    from ..pipeline import tryon\n", {"tryon_lab.pipeline"}),
])
def test_the_graph_reader_sees_each_kind_of_import(tmp_path, source, expected):
    """The checks above are only as good as the reader: relative, aliased and lazy imports all count."""
    known = {"tryon_lab.configure", "tryon_lab.timers", "tryon_lab.pipeline", "tryon_lab.experiments",
             "tryon_lab.experiments.x"}
    path = tmp_path / "x.py"
    path.write_text(source)
    name = "tryon_lab.experiments.x" if source.startswith("def") else "tryon_lab.flow"
    assert imports_of(name, path, known) == expected


def test_a_cycle_and_an_upward_import_are_caught():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert RANK[layer_of("tryon_lab.widgets")] > RANK[layer_of("tryon_lab.pipeline")]
