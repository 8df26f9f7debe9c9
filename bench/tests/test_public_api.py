"""The benchmark reaches pfreeze through its public names only (pfreeze/__init__.py)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pfreeze

BENCH = Path(__file__).resolve().parents[1]


def pfreeze_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of each import of pfreeze or a submodule in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names
                      if a.name.split(".")[0] == "pfreeze"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "pfreeze":
            found.append((node.lineno, node.module or "", [a.name for a in node.names]))
    return found


def test_bench_imports_pfreeze_only_by_its_public_names() -> None:
    files = sorted(BENCH.rglob("*.py"))
    assert BENCH / "driver.py" in files and BENCH / "tests" / "test_bench.py" in files
    seen, wrong = set(), []
    for f in files:
        for line, module, names in pfreeze_imports(f):
            where = f"{f.relative_to(BENCH.parent)}:{line}"
            if module != "pfreeze":  # import pfreeze.x, from pfreeze.x import y
                wrong.append(f"{where} imports {module}")
            seen.update(n for n in names if n != "*")
    assert not wrong, "use `from pfreeze import NAME` (pfreeze/__init__.py):\n" + "\n".join(wrong)
    # every name the bench takes is exported, and resolves
    assert seen <= set(pfreeze.__all__), sorted(seen - set(pfreeze.__all__))
    for name in pfreeze.__all__:
        assert getattr(pfreeze, name) is not None


def test_import_pfreeze_loads_no_submodule_it_does_not_need() -> None:
    """The public names load on first use: `import pfreeze` stays fast (no torch)."""
    code = ("import sys, pfreeze\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pfreeze', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "['pfreeze', 'pfreeze.errors']"
