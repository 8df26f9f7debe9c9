"""Statistics across repeats of the paired experiment (run by pfreeze.run.repeats).

Repeat r runs every arm with seed `training.seed + r` (random init, batch stream) and
generation seed `generation.seed + r`, shared by all arms of that repeat, into
`output_dir/repeat-<r>/` (each a complete run with its own report). `repeats.json` and
`repeats.md` then give, per arm, mean ± 95% CI of each headline figure over repeats, and a
*paired* comparison with the reference arm (the first one): the per-repeat difference
arm − reference, with its mean and CI. Pairing removes the seed-to-seed variation both arms
share, which is why the arms see identical batches in the first place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pfreeze.measure.stats import mean_ci
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


def _table(agg: dict[str, Any], part: str, signed: bool) -> list[str]:
    shown = [f for f in FIGURES if f.table]
    lines = ["| arm | " + " | ".join(f.title for f in shown) + " |",
             "|---|" + "---:|" * len(shown)]
    for arm, e in agg["arms"].items():
        if part == "vs_reference" and arm == agg["reference_arm"]:
            continue
        cells = [fmt_stats(e[part].get(f.key), diff_unit(f.unit) if signed else f.unit, signed)
                 for f in shown]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(agg: dict[str, Any]) -> str:
    """repeats.md: the per-arm figures and the paired differences, in readable units."""
    ref = agg["reference_arm"]
    lines = [f"# pfreeze repeats: {agg['repeats']} seeds", "",
             "Mean ± half-width of the 95% t-interval over repeats. Losses in nats/token; p "
             "in % of generated tokens (differences in percentage points, pp); learning: the "
             "fall of held-out loss, forgetting: the rise of the probe's loss (after training "
             "against before).", "", *_table(agg, "figures", False),
             "", f"## Paired difference: arm − {ref} (same seed, same batches)", "",
             *_table(agg, "vs_reference", True),
             "", "Each repeat's full report: `repeat-<r>/report.html`; all repeats together, "
             "with the claims table: `evidence.html`.", ""]
    return "\n".join(lines)
