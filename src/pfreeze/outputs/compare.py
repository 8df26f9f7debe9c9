"""Two (or more) runs side by side: `pfreeze compare DIR1 DIR2`.

Each folder is a run (its summary.json) or a repeats run (its finished repeats, aggregated as
in repeats.json: mean ± half-width of the 95% CI). Rows are the headline figures of
pfreeze.outputs.repeats in readable units; columns are "<folder>: <arm>".
"""

from __future__ import annotations

from pathlib import Path

from pfreeze.errors import PfreezeError
from pfreeze.outputs.evidence import finished_repeats, is_repeats_dir
from pfreeze.outputs.files import read_summary
from pfreeze.outputs.repeats import FIGURES, aggregate
from pfreeze.outputs.units import fmt, fmt_stats


def _columns(run: Path) -> tuple[dict[str, list[str]], str]:
    """{arm: cells (one per figure)} of one folder, and how many runs it stands for."""
    if is_repeats_dir(run):
        summaries = [s for _, s in finished_repeats(run)]
        agg = aggregate(summaries)
        return ({arm: [fmt_stats(e["figures"].get(f.key), f.unit) for f in FIGURES]
                 for arm, e in agg["arms"].items()}, f"{len(summaries)} repeats")
    summary = read_summary(run)
    if not isinstance(summary, dict) or not summary.get("arms"):
        raise PfreezeError(f"no pfreeze run in {run} (summary.json missing or lists no arms)",
                           "pass the output_dir of a finished `pfreeze run`")
    return ({arm: [fmt(f.get(a), f.unit) for f in FIGURES]
             for arm, a in summary["arms"].items()}, f"1 run, {summary.get('status', '?')}")


def compare(runs: list[Path]) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, notes): one row per figure, one column per folder and arm."""
    header, columns, notes = ["figure"], [], []
    names = [Path(r).name or str(r) for r in runs]
    if len(set(names)) < len(names):  # same last component: the whole path tells them apart
        names = [str(r) for r in runs]
    for run, name in zip(runs, names, strict=True):
        cols, what = _columns(Path(run))
        notes.append(f"{name}: {run} ({what})")
        for arm, cells in cols.items():
            header.append(f"{name}: {arm}")
            columns.append(cells)
    rows = [[f.title, *(c[i] for c in columns)] for i, f in enumerate(FIGURES)]
    return header, rows, notes


def to_markdown(header: list[str], rows: list[list[str]], notes: list[str]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in (header, *rows)]
    lines = ["| " + " | ".join(esc[0]) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join([*lines, "", *(f"- {n}" for n in notes), ""])
