"""The headline figures of an arm and the figure × arm tables built from them.

`FIGURES` names each figure, its unit (pfreeze.outputs.units) and how to read it from an arm's
entry of summary.json. `figure_cells` formats the aggregate of repeats
(pfreeze.outputs.repeats.aggregate) into one cell per figure and arm; repeats.md, the evidence
report and `pfreeze compare` lay those cells out, arms as rows or as columns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pfreeze.outputs.units import diff_unit, fmt_stats


def _get(key: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda a: a.get(key)


def _gap(a: dict[str, Any]) -> float | None:
    v, t = a.get("val_loss_after"), a.get("train_loss_after")
    return None if v is None or t is None else v - t


def _p(moment: str, field: str = "mean") -> Callable[[dict[str, Any]], float | None]:
    return lambda a: (a.get(moment) or {}).get(field)


def _p_rise(a: dict[str, Any]) -> float | None:
    after, before = _p("p_after")(a), _p("p_before")(a)
    return None if after is None or before is None else after - before


@dataclass(frozen=True)
class Figure:
    """One headline figure of an arm: its key in repeats.json, its title, its unit
    (pfreeze.outputs.units) and how to read it from the arm's summary."""

    key: str
    title: str
    unit: str
    get: Callable[[dict[str, Any]], float | None]
    table: bool = True  # in repeats.md's tables (the rest: repeats.json and the claims)


FIGURES: list[Figure] = [
    Figure("trainable_params", "trainable params", "params", _get("trainable_params")),
    Figure("median_step_time_s", "median step", "ms", _get("median_step_time_s")),
    Figure("tokens_per_s", "throughput", "ktok/s", _get("tokens_per_s")),
    Figure("peak_mem_mb", "peak memory", "MiB", _get("peak_mem_mb")),
    Figure("last_loss", "last loss", "nats", _get("last_loss"), table=False),
    Figure("mean_loss", "mean loss", "nats", _get("mean_loss"), table=False),
    Figure("val_loss_best", "held-out best", "nats", _get("val_loss_best")),
    Figure("val_loss_best_step", "best step", "params", _get("val_loss_best_step")),
    Figure("val_loss_after", "held-out after", "nats", _get("val_loss_after")),
    Figure("overfit_gap", "overfit gap", "nats", _gap),
    Figure("p_after", "p after", "%", _p("p_after")),
    Figure("p_rise", "p rise", "pp", _p_rise, table=False),
    Figure("p_spread_after", "p spread (std) after", "pp", _p("p_after", "std"), table=False),
    Figure("probe_loss_before", "probe before", "nats", _get("probe_loss_before"), table=False),
    Figure("probe_loss_after", "probe after", "nats", _get("probe_loss_after"), table=False),
    Figure("learning_best", "learning (best)", "nats", _get("learning_best"), table=False),
    Figure("learning_after", "learning", "nats", _get("learning_after")),
    Figure("forgetting_best", "forgetting (best)", "nats", _get("forgetting_best"),
           table=False),
    Figure("forgetting_after", "forgetting", "nats", _get("forgetting_after")),
]
BY_KEY = {f.key: f for f in FIGURES}


def figure_cells(agg: dict[str, Any], part: str = "figures",
                 figures: Sequence[Figure] = FIGURES) -> dict[str, list[str]]:
    """{arm: one cell per figure} of an aggregate: mean ± 95% CI half-width in the figure's
    unit. `part` "vs_reference": the signed paired difference arm − reference (in points for
    percentages), for every arm but the reference."""
    diff = part == "vs_reference"
    return {arm: [fmt_stats(e[part].get(f.key), diff_unit(f.unit) if diff else f.unit, diff)
                  for f in figures]
            for arm, e in agg["arms"].items() if not (diff and arm == agg["reference_arm"])}


def by_figure(columns: Sequence[Sequence[str]],
              figures: Sequence[Figure] = FIGURES) -> list[list[str]]:
    """Columns of cells (one cell per figure each) as rows: [title, cell, cell, ...]."""
    return [[f.title, *(c[i] for c in columns)] for i, f in enumerate(figures)]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table, the first column left-aligned, the figures right; a '|'
    inside a cell (an arm's name) is escaped."""
    esc = [[c.replace("|", "\\|") for c in r] for r in (header, *rows)]
    return ["| " + " | ".join(esc[0]) + " |", "|---|" + "---:|" * (len(header) - 1),
            *("| " + " | ".join(r) + " |" for r in esc[1:])]
