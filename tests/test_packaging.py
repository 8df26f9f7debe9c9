"""Packaging: `pfreeze --version`, shell completion from typer, the extras the README names."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

import pfreeze
from pfreeze.cli import app

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = (ROOT / "pyproject.toml").read_text(encoding="utf-8")  # tomllib: Python 3.11+


def test_version_is_the_packages() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"pfreeze {pfreeze.__version__}"
    assert f'\nversion = "{pfreeze.__version__}"\n' in PYPROJECT


def test_shell_completion_completes_commands_and_options() -> None:
    def complete(words: str) -> list[str]:
        env = {"_PFREEZE_COMPLETE": "complete_bash", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - (not words.endswith(" ")))}
        result = CliRunner().invoke(app, [], prog_name="pfreeze", env=env)
        assert result.exit_code == 0, result.output
        return result.output.split()

    assert complete("pfreeze ex") == ["export"]
    assert "--arm" in complete("pfreeze export runs/x --")
    script = CliRunner().invoke(app, ["--show-completion", "bash"], prog_name="pfreeze")
    assert "_PFREEZE_COMPLETE=complete_bash" in script.output


def test_the_readme_names_the_extras_and_the_notebook_needs_the_dev_ones() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for extra in ("trackers", "dist"):
        assert re.search(rf"pip install -e? ?['\"]?\.?\[{extra}\]", readme), extra
    dev = re.search(r"\ndev = \[(.*?)\]", PYPROJECT, re.S)
    assert dev and all(p in dev.group(1) for p in ("nbclient", "ipykernel", "nbformat"))
    deps = re.search(r"\ndependencies = \[(.*?)\]", PYPROJECT, re.S)
    assert deps and '"pandas' in deps.group(1)
