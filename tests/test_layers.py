"""The layout holds: imports point one way down the layers of docs/ARCHITECTURE.md, no import
cycle anywhere in pfreeze, no module over 400 lines, no function over 60.

Imports are read from the source with `ast`, all of them: at module level, inside functions
and under `if TYPE_CHECKING:` alike (a type-only import is still a dependency a reader follows).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# Bottom to top; a module may import its own layer and the layers below it.
LAYERS = [
    ("foundation", ("pfreeze.errors", "pfreeze.atomic", "pfreeze.settings")),
    ("models and data", ("pfreeze.models", "pfreeze.data")),
    ("what trains", ("pfreeze.plan",)),
    ("measurement", ("pfreeze.measure",)),
    ("outputs", ("pfreeze.outputs",)),
    ("the run", ("pfreeze.run",)),
    ("entry points", ("pfreeze.config", "pfreeze.cli", "pfreeze.tables", "pfreeze.export",
                      "pfreeze.api")),
]


def _modules(root: Path = SRC) -> dict[str, Path]:
    return {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
            for p in (root / "pfreeze").rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The pfreeze modules `name` imports (a name imported from a package counts as the
    submodule when there is one: `from pfreeze.run import moments`)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in known:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name and t.startswith("pfreeze."):
                out.add(t)
                break  # the most specific module only
    return out


def layer_of(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/ARCHITECTURE.md")


def graph(root: Path = SRC) -> dict[str, set[str]]:
    mods = _modules(root)
    return {m: _imports(m, p, set(mods)) for m, p in mods.items() if m != "pfreeze"}


def upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
                  for a, targets in edges.items() for b in targets
                  if b != "pfreeze" and layer_of(b) > layer_of(a))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle's modules, found by depth-first search from each module."""
    found: list[list[str]] = []
    for start in sorted(edges):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(edges.get(node, ())):
                if nxt == start:
                    found.append(path)
                elif nxt not in path and nxt > start:  # each cycle once, from its least module
                    stack.append((nxt, [*path, nxt]))
    return found


def test_every_module_is_in_a_layer_and_imports_point_down() -> None:
    edges = graph()
    assert len(edges) > 30  # the walk found the package
    assert upward(edges) == []


def test_no_import_cycle() -> None:
    assert cycles(graph()) == []


def test_the_checks_catch_what_they_forbid(tmp_path: Path) -> None:
    """The checks themselves can fail: a copy of the package with one upward import added."""
    import shutil

    shutil.copytree(SRC / "pfreeze", tmp_path / "pfreeze")
    masks = tmp_path / "pfreeze" / "plan" / "masks.py"
    masks.write_text(masks.read_text() + "\nfrom pfreeze.run.loop import Loop  # noqa\n")
    edges = graph(tmp_path)
    assert upward(edges) == ["pfreeze.plan.masks (what trains) imports pfreeze.run.loop (the run)"]
    assert any("pfreeze.plan.masks" in c for c in cycles(edges))  # run imports plan


@pytest.mark.parametrize("path", sorted((SRC / "pfreeze").rglob("*.py")), ids=lambda p: p.name)
def test_modules_and_functions_stay_small(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 400, f"{path} has {len(text.splitlines())} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            assert n <= 60, f"{path}:{node.lineno} {node.name}() has {n} lines"
