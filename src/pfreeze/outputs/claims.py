"""The claims table: each claim of the method, measured, with a verdict decided by the 95%
confidence interval over repeats and never written by hand.

Every claim compares an arm with the reference arm (the first, usually full fine-tuning), on
the paired per-repeat differences arm − reference (pfreeze.outputs.repeats.aggregate):

    holds          the whole interval lies on the side the claim says
    contradicted   the whole interval lies on the other side (or at zero, for a claim of
                   "fewer" or "less" that an exact, zero-spread figure does not meet)
    not shown      the interval straddles zero, there is no interval (one repeat), or the
                   figure was not measured (peak memory on a CPU, the probe turned off)

"p rises with less spread" has two parts, the rise of p (after − before, the arm's own) and the
spread of p after against the reference's: it holds when both do and is contradicted when
either is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pfreeze.outputs.figures import BY_KEY
from pfreeze.outputs.units import diff_unit, fmt_ci, fmt_stats

HOLDS, CONTRADICTED, NOT_SHOWN = "holds", "contradicted", "not shown"


@dataclass(frozen=True)
class Claim:
    """One claim: `key` a figure of pfreeze.outputs.figures, `lower` whether the claim says
    the arm's value is below the reference's (else above), `own` whether the figure is the
    arm's own rather than its paired difference with the reference."""

    name: str
    key: str
    lower: bool = True
    own: bool = False
    unmeasured: str = "not measured"


CLAIMS: list[tuple[str, list[Claim]]] = [
    ("fewer trainable parameters", [Claim("fewer trainable parameters", "trainable_params")]),
    ("faster steps", [Claim("faster steps", "median_step_time_s")]),
    ("less memory", [Claim("less memory", "peak_mem_mb",
                           unmeasured="peak memory is measured on a GPU only")]),
    ("less overfitting", [Claim("less overfitting", "overfit_gap")]),
    ("p rises with less spread", [Claim("p rises", "p_rise", lower=False, own=True),
                                  Claim("with less spread", "p_spread_after")]),
    ("knowledge preserved", [Claim("forgets less", "forgetting_after",
                                   unmeasured="the forgetting probe was off")]),
    ("same or better optimum", [Claim("best held-out loss", "val_loss_best")]),
]


def verdict(stats: dict[str, Any] | None, lower: bool) -> str:
    """holds / contradicted / not shown, from the 95% interval of `stats`."""
    if not stats or stats.get("mean") is None:
        return NOT_SHOWN
    lo, hi = (stats.get("ci95") or [None, None])[:2]
    if lo is None or hi is None:
        return NOT_SHOWN  # one repeat: no interval
    if not lower:
        lo, hi = -hi, -lo
    if hi < 0:
        return HOLDS
    if lo >= 0:
        return CONTRADICTED
    return NOT_SHOWN


def _combine(verdicts: list[str]) -> str:
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    return HOLDS if all(v == HOLDS for v in verdicts) else NOT_SHOWN


def _relative(diff: dict[str, Any] | None, ref: dict[str, Any] | None) -> str:
    """The mean difference as a share of the reference's mean: ' (−48%)'."""
    d, r = (diff or {}).get("mean"), (ref or {}).get("mean")
    if d is None or not r:
        return ""
    return f" ({100 * d / r:+.0f}%)"


def _part(claim: Claim, arm: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    stats = (arm["figures"] if claim.own else arm["vs_reference"]).get(claim.key)
    fig = BY_KEY[claim.key]
    unit = fig.unit if claim.own else diff_unit(fig.unit)
    measured = bool(stats) and stats.get("mean") is not None
    # a share of the reference where the figure is a size (time, memory, count)
    share = _relative(stats, ref["figures"].get(claim.key)) \
        if not claim.own and fig.unit in ("ms", "MiB", "params") else ""
    what = "" if claim.own else f"{share} vs reference"
    return {"name": claim.name, "verdict": verdict(stats, claim.lower),
            "figure": (f"{fig.title}: {fmt_stats(stats, unit, signed=True)}{what}, 95% CI "
                       f"{fmt_ci(stats, unit)}") if measured
            else f"{fig.title}: {claim.unmeasured}",
            "measured": measured}


def claims_table(agg: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per claim and compared arm: {claim, arm, figure, verdict, why}."""
    ref = agg["reference_arm"]
    rows = []
    for title, parts in CLAIMS:
        for name, arm in agg["arms"].items():
            if name == ref:
                continue
            done = [_part(c, arm, agg["arms"][ref]) for c in parts]
            v = _combine([d["verdict"] for d in done])
            rows.append({"claim": title, "arm": name, "reference": ref,
                         "figure": "; ".join(d["figure"] for d in done), "verdict": v,
                         "why": _why(v, done, agg["repeats"])})
    return rows


def _why(v: str, parts: list[dict[str, Any]], repeats: int) -> str:
    if v != NOT_SHOWN:
        return "the 95% interval lies on one side of zero"
    if not all(p["measured"] for p in parts):
        return "not measured in this run"
    if repeats < 2:
        return "one repeat gives no interval"
    return "the 95% interval includes zero"
