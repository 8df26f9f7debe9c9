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
from typing import Any

from pfreeze.measure.stats import mean_ci

# (label, getter) for each headline figure of an arm summary.
HEADLINES: list[tuple[str, Callable[[dict[str, Any]], float | None]]] = [
    ("median_step_time_s", lambda a: a["median_step_time_s"]),
    ("tokens_per_s", lambda a: a["tokens_per_s"]),
    ("last_loss", lambda a: a["last_loss"]),
    ("mean_loss", lambda a: a["mean_loss"]),
    ("val_loss_best", lambda a: a["val_loss_best"]),
    ("val_loss_after", lambda a: a["val_loss_after"]),
    ("overfit_gap", lambda a: None if a["val_loss_after"] is None or a["train_loss_after"] is None
     else a["val_loss_after"] - a["train_loss_after"]),
    ("p_after", lambda a: a["p_after"]["mean"]),
]


def _stats(values: list[float | None]) -> dict[str, Any]:
    kept = [v for v in values if v is not None]
    s = mean_ci(kept)
    return {"mean": s["mean"] if kept else None, "ci95": s["ci95"], "n": len(kept),
            "values": values}


def aggregate(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm: mean ± CI of each headline, and paired differences against the first arm."""
    arms = list(summaries[0]["arms"])
    ref = arms[0]
    out: dict[str, Any] = {"repeats": len(summaries), "reference_arm": ref, "arms": {}}
    for arm in arms:
        rows = [s["arms"][arm] for s in summaries]
        entry: dict[str, Any] = {"trainable_params": rows[0]["trainable_params"],
                                 "figures": {}, "vs_reference": {}}
        for label, get in HEADLINES:
            vals = [get(r) for r in rows]
            entry["figures"][label] = _stats(vals)
            if arm != ref:
                refs = [get(s["arms"][ref]) for s in summaries]
                diffs = [None if a is None or b is None else a - b
                         for a, b in zip(vals, refs, strict=True)]
                entry["vs_reference"][label] = _stats(diffs)
        out["arms"][arm] = entry
    return out


def _fmt(s: dict[str, Any]) -> str:
    if s["mean"] is None:
        return "—"
    lo, hi = s["ci95"]
    return f"{s['mean']:.4g}" + ("" if lo is None else f" ± {(hi - lo) / 2:.2g}")


def render_markdown(agg: dict[str, Any]) -> str:
    labels = [label for label, _ in HEADLINES]
    lines = [f"# pfreeze repeats: {agg['repeats']} seeds", "",
             "Mean ± half-width of the 95% t-interval over repeats.", "",
             "| arm | trainable | " + " | ".join(labels) + " |",
             "|---|---:|" + "---:|" * len(labels)]
    for arm, e in agg["arms"].items():
        cells = [_fmt(e["figures"][lab]) for lab in labels]
        lines.append(f"| {arm} | {e['trainable_params']:,} | " + " | ".join(cells) + " |")
    ref = agg["reference_arm"]
    lines += ["", f"## Paired difference: arm − {ref} (same seed, same batches)", "",
              "| arm | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for arm, e in agg["arms"].items():
        if arm != ref:
            lines.append(f"| {arm} | " + " | ".join(_fmt(e["vs_reference"][lab])
                                                  for lab in labels) + " |")
    lines += ["", "Each repeat's full report: `repeat-<r>/report.html`.", ""]
    return "\n".join(lines)


