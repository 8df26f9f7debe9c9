"""Statistics across repeats of the paired experiment (run by pfreeze.run.repeats).

Repeat r runs every arm with seed `training.seed + r` (random init, batch stream) and
generation seed `generation.seed + r`, shared by all arms of that repeat, into
`output_dir/repeat-<r>/` (each a complete run with its own report). `repeats.json` and
`repeats.md` then give, per arm, mean ± 95% CI of each headline figure
(pfreeze.outputs.figures) over repeats, and a *paired* comparison with the reference arm (the
first one): the per-repeat difference arm − reference, with its mean and CI. Pairing removes
the seed-to-seed variation both arms share, which is why the arms see identical batches in the
first place.
"""

from __future__ import annotations

from typing import Any

from pfreeze.measure.stats import mean_ci
from pfreeze.outputs.figures import FIGURES, figure_cells, markdown_table


def _stats(values: list[float | None]) -> dict[str, Any]:
    kept = [v for v in values if v is not None]
    s = mean_ci(kept)
    return {"mean": s["mean"] if kept else None, "ci95": s["ci95"], "std": s["std"],
            "n": len(kept), "values": values}


def aggregate(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm: mean ± CI of each headline, and paired differences against the first arm."""
    arms = list(summaries[0]["arms"])
    ref = arms[0]
    out: dict[str, Any] = {"repeats": len(summaries), "reference_arm": ref, "arms": {},
                           "device": (summaries[0].get("environment") or {}).get("device")}
    for arm in arms:
        rows = [s["arms"].get(arm) or {} for s in summaries]
        entry: dict[str, Any] = {"trainable_params": rows[0].get("trainable_params"),
                                 "figures": {}, "vs_reference": {}}
        for f in FIGURES:
            vals = [f.get(r) for r in rows]
            entry["figures"][f.key] = _stats(vals)
            if arm != ref:
                refs = [f.get(s["arms"].get(ref) or {}) for s in summaries]
                diffs = [None if a is None or b is None else a - b
                         for a, b in zip(vals, refs, strict=True)]
                entry["vs_reference"][f.key] = _stats(diffs)
        out["arms"][arm] = entry
    return out


def _table(agg: dict[str, Any], part: str) -> list[str]:
    """Arms as rows, the figures of repeats.md as columns."""
    shown = [f for f in FIGURES if f.table]
    cells = figure_cells(agg, part, shown)
    return markdown_table(["arm", *(f.title for f in shown)],
                          [[arm, *c] for arm, c in cells.items()])


def render_markdown(agg: dict[str, Any]) -> str:
    """repeats.md: the per-arm figures and the paired differences, in readable units."""
    ref = agg["reference_arm"]
    lines = [f"# pfreeze repeats: {agg['repeats']} seeds", "",
             "Mean ± half-width of the 95% t-interval over repeats. Losses in nats/token; p "
             "in % of generated tokens (differences in percentage points, pp); learning: the "
             "fall of held-out loss, forgetting: the rise of the probe's loss (after training "
             "against before).", "", *_table(agg, "figures"),
             "", f"## Paired difference: arm − {ref} (same seed, same batches)", "",
             *_table(agg, "vs_reference"),
             "", "Each repeat's full report: `repeat-<r>/report.html`; all repeats together, "
             "with the claims table: `evidence.html`.", ""]
    return "\n".join(lines)
