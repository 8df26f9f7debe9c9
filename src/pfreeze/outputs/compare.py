"""Two (or more) runs side by side: `pfreeze compare DIR1 DIR2`.

Each folder is a run (its summary.json) or a repeats run (its finished repeats, aggregated as
in repeats.json: mean ± half-width of the 95% CI). Rows are the headline figures of
pfreeze.outputs.figures in readable units; columns are "<folder>: <arm>".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pfreeze.errors import PfreezeError
from pfreeze.outputs.figures import by_figure, figure_cells, markdown_table
from pfreeze.outputs.files import finished_repeats, is_repeats_dir, read_summary
from pfreeze.outputs.repeats import aggregate


def _summaries(run: Path) -> tuple[list[dict[str, Any]], str]:
    """The summaries a folder stands for (its finished repeats, or its one run) and in words
    how many runs they are."""
    if is_repeats_dir(run):
        summaries = [s for _, s in finished_repeats(run)]
        return summaries, f"{len(summaries)} repeats"
    summary = read_summary(run)
    if not isinstance(summary, dict) or not summary.get("arms"):
        raise PfreezeError(f"no pfreeze run in {run} (summary.json missing or lists no arms)",
                           "pass the output_dir of a finished `pfreeze run`")
    return [summary], f"1 run, {summary.get('status', '?')}"


def compare(runs: list[Path]) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, notes): one row per figure, one column per folder and arm. A single run
    aggregates to its own figures (no interval), a repeats run to mean ± CI half-width."""
    header, columns, notes = ["figure"], [], []
    names = [Path(r).name or str(r) for r in runs]
    if len(set(names)) < len(names):  # same last component: the whole path tells them apart
        names = [str(r) for r in runs]
    for run, name in zip(runs, names, strict=True):
        summaries, what = _summaries(Path(run))
        notes.append(f"{name}: {run} ({what})")
        for arm, cells in figure_cells(aggregate(summaries)).items():
            header.append(f"{name}: {arm}")
            columns.append(cells)
    return header, by_figure(columns), notes


def to_markdown(header: list[str], rows: list[list[str]], notes: list[str]) -> str:
    return "\n".join([*markdown_table(header, rows), "", *(f"- {n}" for n in notes), ""])
