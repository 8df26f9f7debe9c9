"""The evidence report's figures: curves averaged over repeats with 95% bands, and the
learning-vs-forgetting scatter (one point per arm and repeat, at the best step and at the end).

Arm i keeps colour i, as in every per-run plot (pfreeze.outputs.plots).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pfreeze.measure.stats import t_quantile
from pfreeze.outputs.plots import _STYLE, _TAB10, _legend, _save, num, plt

Row = dict[str, Any]
# (panel title, y label, metrics row kind, how a row gives the value)
CURVES: list[tuple[str, str, str, Any]] = [
    ("Training loss", "nats/token", "train", lambda r: num(r.get("loss"))),
    ("Held-out loss (corpus)", "nats/token", "eval", lambda r: num(r.get("val_loss"))),
    ("Probe loss (general text: forgetting)", "nats/token", "eval",
     lambda r: num(r.get("probe_loss"))),
    (r"Drift $\|W - W_0\|_F$ of the tracked matrices", "Frobenius norm", "train",
     lambda r: math.sqrt(sum(num(v) ** 2 for v in (r.get("dw0") or {}).values()))
     if r.get("dw0") else math.nan),
]


def band(runs: list[dict[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Steps every repeat measured, the mean there and its 95% t-interval (lo, hi); without a
    second repeat the interval is the mean itself."""
    steps = sorted(set.intersection(*(set(r) for r in runs))) if runs else []
    if not steps:
        empty = np.array([])
        return empty, empty, empty, empty
    vals = np.array([[r[s] for r in runs] for s in steps], dtype=float)
    mean, n = vals.mean(axis=1), vals.shape[1]
    if n > 1:
        half = t_quantile(n - 1) * vals.std(axis=1, ddof=1) / math.sqrt(n)
    else:
        half = np.zeros_like(mean)
    return np.array(steps, dtype=float), mean, mean - half, mean + half


def series(rows: list[Row], arm: str, kind: str, get: Any) -> dict[int, float]:
    """step -> value of one arm's rows of `kind` (missing values dropped)."""
    out = {}
    for r in rows:
        if str(r.get("arm")) == arm and r.get("kind") == kind:
            v = get(r)
            if math.isfinite(v):
                out[int(r["step"])] = v
    return out


def plot_curves(repeats: list[list[Row]], arms: list[str], path: Path) -> Path:
    """The four curves, each arm's mean over repeats with its 95% band."""
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), layout="constrained")
        for ax, (title, ylabel, kind, get) in zip(axes.flat, CURVES, strict=True):
            drawn = False
            for i, arm in enumerate(arms):
                runs = [s for s in (series(rows, arm, kind, get) for rows in repeats) if s]
                x, mean, lo, hi = band(runs)
                if not len(x):
                    continue
                colour = _TAB10[i % 10]
                style = {"marker": "o", "ms": 4} if kind == "eval" else {}
                ax.plot(x, mean, color=colour, lw=1.4, label=arm, **style)
                ax.fill_between(x, lo, hi, color=colour, alpha=0.2, lw=0)
                drawn = True
            ax.set(title=title, xlabel="step", ylabel=ylabel)
            if drawn:
                _legend(ax, len(arms))
            else:
                ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
        fig.suptitle(f"Mean over {len(repeats)} repeat(s), shaded: 95% confidence band")
        return _save(fig, path)


def plot_scatter(points: list[dict[str, Any]], arms: list[str], path: Path) -> Path:
    """Learning (x) against forgetting (y): circles at each arm's best step, squares at the
    end; one point per arm and repeat."""
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 5.5), layout="constrained")
        drawn = False
        for i, arm in enumerate(arms):
            for moment, marker, fill in (("best", "o", True), ("after", "s", False)):
                xy = [(p["learning"], p["forgetting"]) for p in points
                      if p["arm"] == arm and p["moment"] == moment
                      and p["learning"] is not None and p["forgetting"] is not None]
                if not xy:
                    continue
                colour = _TAB10[i % 10]
                xs, ys = zip(*xy, strict=True)
                ax.scatter(xs, ys, s=46, marker=marker, edgecolors=colour, linewidths=1.5,
                           facecolors=colour if fill else "none", label=f"{arm}, {moment}")
                drawn = True
        ax.axhline(0, color="black", lw=0.8, ls=":")
        ax.set(title="Learning vs forgetting (one point per arm and repeat)",
               xlabel="learning: fall of held-out loss (nats/token; right is better)",
               ylabel="forgetting: rise of probe loss (nats/token; lower is better)")
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no probe measured", ha="center", transform=ax.transAxes)
        return _save(fig, path)
