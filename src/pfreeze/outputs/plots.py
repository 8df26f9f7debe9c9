"""The report's plots: one PNG per figure, drawn from metrics.jsonl rows and summary.json.

Every arm keeps one colour across all plots, and the figures are written atomically (a killed
report leaves no half-written PNG). report.py embeds them in report.md and report.html.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from pfreeze.atomic import atomic_write  # noqa: E402

DASH = "—"
_KEY = re.compile(r"^L(\d+)\.(.+)$")  # tracked-matrix keys look like "L12.q"
# one place for the shared look, applied with rc_context so callers' settings are untouched
_STYLE = {"savefig.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 8}
_TAB10 = plt.get_cmap("tab10").colors  # arm i keeps colour i in every plot
# A frozen matrix's cell in dw0.png: grey and hatched, unlike any colour of the drift scale
_FROZEN = {"facecolor": "#d0d0d0", "edgecolor": "#7a7a7a", "hatch": "///", "linewidth": 0}
Row = dict[str, Any]
Summary = dict[str, Any]


def num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def _rows(rows: list[Row], arm: str, kind: str) -> list[Row]:
    return [r for r in rows if str(r["arm"]) == arm and r.get("kind") == kind]


def _series(rows: list[Row], arm: str, kind: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of `key` for one arm, with missing (None) values dropped."""
    pts = [(r["step"], num(r.get(key))) for r in _rows(rows, arm, kind)]
    xy = np.array([p for p in pts if math.isfinite(p[1])], dtype=float).reshape(-1, 2)
    return xy[:, 0], xy[:, 1]


def _split_key(key: str) -> tuple[int, str]:
    m = _KEY.match(key)
    return (int(m.group(1)), m.group(2)) if m else (-1, key)


def ci95(p: dict[str, Any]) -> tuple[float, float]:
    ci = p.get("ci95")
    return (num(ci[0]), num(ci[1])) if isinstance(ci, list) and len(ci) == 2 else (math.nan,) * 2


def _legend(ax: Any, n_arms: int) -> None:
    # beyond three arms the legend would cover the curves, so it moves to the right margin
    ax.legend(**({"loc": "upper left", "bbox_to_anchor": (1.01, 1)} if n_arms > 3 else {"ncol": 2}))


def _save(fig: Figure, path: Path) -> Path:
    # format is explicit because atomic_write hands savefig a ".tmp" name
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path


def _plot_loss(rows: list[Row], summary: Summary, arms: list[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 5), layout="constrained")
    for i, arm in enumerate(arms):
        x, y = _series(rows, arm, "train", "loss")
        ax.plot(x, y, color=_TAB10[i % 10], lw=1.3, label=f"{arm} train")
        w = max(3, min(50, len(y) // 15))
        if len(y) >= 2 * w:  # a wide faint band shows the trend without hiding the raw curve
            ma = np.convolve(y, np.ones(w) / w, mode="valid")
            ax.plot(x[w - 1 :], ma, color=_TAB10[i % 10], lw=5, alpha=0.25, zorder=1)
        vx, vy = _series(rows, arm, "eval", "val_loss")
        if vy.size:
            ax.plot(vx, vy, "o", color=_TAB10[i % 10], mec="black", ms=7, label=f"{arm} val")
        px, py = _series(rows, arm, "eval", "probe_loss")
        if py.size:  # the forgetting probe: general text, never trained on
            ax.plot(px, py, "s", color=_TAB10[i % 10], mfc="none", mew=1.5, ms=7,
                    label=f"{arm} probe")
    ax.set(title="Training loss (line, with moving average), held-out loss (dots), probe loss "
           "(squares)",
           xlabel="step", ylabel="cross-entropy loss (nats/token)")
    _legend(ax, len(arms))
    return _save(fig, path)


def _plot_scatter(rows: list[Row], summary: Summary, arms: list[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 6), layout="constrained")
    ref = dict(zip(*_series(rows, arms[0], "train", "loss"), strict=True))
    lo, hi = math.inf, -math.inf
    for i, arm in enumerate(arms[1:], start=1):
        pairs = [(ref[s], v) for s, v in zip(*_series(rows, arm, "train", "loss"), strict=True)
                 if s in ref]  # only steps both arms logged; they saw the same batch there
        if pairs:
            xy = np.array(pairs)
            ax.scatter(xy[:, 0], xy[:, 1], s=18, alpha=0.7, color=_TAB10[i % 10], label=arm)
            lo, hi = min(lo, xy.min()), max(hi, xy.max())
    if math.isfinite(lo):
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
        ax.legend()
    ax.set(title=f"Paired loss per step (below the line: lower loss than {arms[0]})",
           xlabel=f"{arms[0]} loss at step k (nats/token)",
           ylabel="other arm's loss at step k (nats/token)")
    return _save(fig, path)


def _plot_step_time(rows: list[Row], summary: Summary, arms: list[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 4.5), layout="constrained")
    for i, arm in enumerate(arms):
        x, y = _series(rows, arm, "train", "step_time_s")
        if y.size:
            med = float(np.median(y))
            ax.plot(x, y, color=_TAB10[i % 10], lw=1.2, label=f"{arm} (median {med:.3g} s)")
            ax.axhline(med, color=_TAB10[i % 10], ls="--", lw=1)
    ax.set(title="Wall-clock time per optimiser step (dashed: median)", xlabel="step",
           ylabel="step time (s)")
    ax.set_ylim(bottom=0)
    _legend(ax, len(arms))
    return _save(fig, path)


def _grid(n: int, ncols: int, w: float, h: float) -> tuple[Figure, list[Any]]:
    cols, nrows = min(n, ncols), math.ceil(n / min(n, ncols))
    fig, axes = plt.subplots(nrows, cols, figsize=(w * cols, h * nrows), squeeze=False,
                             layout="constrained")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)[:n]


def _layer_norms(rows: list[Row], arm: str) -> dict[int, list[tuple[float, float]]]:
    """Per layer, (step, ‖ΔW‖) with the roles of a layer combined as one Frobenius norm."""
    per_layer: dict[int, list[tuple[float, float]]] = {}
    for r in _rows(rows, arm, "train"):
        sq: dict[int, float] = {}
        for k, v in (r.get("dw") or {}).items():
            sq[_split_key(k)[0]] = sq.get(_split_key(k)[0], 0.0) + np.nan_to_num(num(v)) ** 2
        for layer, s in sq.items():
            per_layer.setdefault(layer, []).append((r["step"], math.sqrt(s)))
    return per_layer


def _plot_dw(rows: list[Row], summary: Summary, arms: list[str], path: Path) -> Path:
    fig, axes = _grid(len(arms), 2, 6.5, 4)
    layers = sorted({_split_key(k)[0] for r in rows for k in (r.get("dw") or {})} or {0})
    norm = matplotlib.colors.Normalize(min(layers), max(max(layers), min(layers) + 1))
    cmap = plt.get_cmap("viridis")
    norms = {arm: _layer_norms(rows, arm) for arm in arms}
    positive = [y for pl in norms.values() for pts in pl.values() for _, y in pts if y > 0]
    for ax, arm in zip(axes, arms, strict=True):
        for layer, pts in sorted(norms[arm].items()):
            ax.plot(*zip(*pts, strict=True), color=cmap(norm(layer)), lw=1)
        if positive:
            # Updates span orders of magnitude, but a step can be exactly 0 (lr 0 at warm-up,
            # a frozen layer): a log axis would drop those points, so the axis is linear
            # below the smallest real update and logarithmic above it.
            thresh = 10 ** math.floor(math.log10(min(positive)))
            ax.set_yscale("symlog", linthresh=thresh, linscale=0.5)
            ax.set_ylim(bottom=-0.15 * thresh)  # lifts a line at 0 off the bottom spine
        if not norms[arm]:
            ax.text(0.5, 0.5, "no tracked matrices", ha="center", transform=ax.transAxes)
        ax.set(title=f"{arm}: per-step update size", xlabel="step",
               ylabel=r"$\|W_t - W_{t-1}\|_F$ per layer")
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="layer",
                 ticks=matplotlib.ticker.MaxNLocator(integer=True))
    return _save(fig, path)


def frozen_keys(rows: list[Row], summary: Summary, arm: str) -> set[str]:
    """The tracked ‖ΔW‖ keys ("L3.q") of matrices that `arm` never trains.

    summary.json says so when it lists them; for runs that do not (older or killed runs) a
    matrix whose drift from θ₀ is exactly 0.0 in every logged step is taken as frozen.
    """
    listed = ((summary.get("arms") or {}).get(arm) or {}).get("tracked_frozen")
    if isinstance(listed, list):
        return {str(k) for k in listed}
    drifts = [r.get("dw0") or {} for r in _rows(rows, arm, "train")]
    keys = {k for d in drifts for k in d}
    return {k for k in keys if all(num(d[k]) == 0.0 for d in drifts if k in d)}


def _hatch_frozen(ax: Any, cells: list[tuple[int, int]]) -> None:
    for i, j in cells:  # imshow centres cell (i, j) on (j, i)
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, **_FROZEN))


def _plot_dw0(rows: list[Row], summary: Summary, arms: list[str], path: Path) -> Path:
    last = {a: ([{}] + _rows(rows, a, "train"))[-1].get("dw0") or {} for a in arms}
    keys = [_split_key(k) for d in last.values() for k in d]
    layers = sorted({k[0] for k in keys}) or [0]
    roles = sorted({k[1] for k in keys}, key=lambda r: ("qkvo".find(r) % 10, r)) or [DASH]
    grids = {a: np.full((len(layers), len(roles)), np.nan) for a in arms}
    frozen: dict[str, list[tuple[int, int]]] = {a: [] for a in arms}
    for a, d in last.items():
        never = frozen_keys(rows, summary, a)
        for k, v in d.items():
            cell = layers.index(_split_key(k)[0]), roles.index(_split_key(k)[1])
            # a frozen matrix is left out of the colour map: drift 0 there is no result
            grids[a][cell] = math.nan if k in never else num(v)
            if k in never:
                frozen[a].append(cell)
    vmax = max([np.nanmax(g) for g in grids.values() if np.isfinite(g).any()] + [1e-12])
    fig, axes = _grid(len(arms), 4, 3.2, max(3.0, 0.2 * len(layers) + 1.5))
    for ax, arm in zip(axes, arms, strict=True):
        # one colour scale for all arms, so trained blocks compare at a glance
        image = ax.imshow(grids[arm], aspect="auto", cmap="magma", vmin=0, vmax=vmax)
        _hatch_frozen(ax, frozen[arm])
        ax.set_xticks(range(len(roles)), roles)
        ax.set_yticks(range(len(layers)), [f"L{x}" if x >= 0 else "other" for x in layers],
                      fontsize=7)
        ax.set(title=f"{arm}: final drift from θ₀", xlabel="role")
        ax.grid(False)
    fig.colorbar(image, ax=axes, label=r"$\|W_T - W_0\|_F$")
    if any(frozen.values()):
        fig.legend(handles=[Patch(label="frozen (never trains)", **_FROZEN)],
                   loc="outside lower center")
    return _save(fig, path)


def _plot_p(rows: list[Row], summary: Summary, arms: list[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(arms) + 3), 4.5), layout="constrained")
    for i, arm in enumerate(arms):
        for j, key in enumerate(("p_before", "p_after")):
            p = ((summary.get("arms") or {}).get(arm) or {}).get(key) or {}
            mean, ci = num(p.get("mean")), ci95(p)
            if math.isfinite(mean):
                err = [[mean - ci[0]], [ci[1] - mean]] if math.isfinite(sum(ci)) else None
                ax.bar(i + (j - 0.5) * 0.38, mean, 0.38, yerr=err, capsize=4, color=_TAB10[i % 10],
                       alpha=0.45 if j == 0 else 0.95, edgecolor="black",
                       label=key[2:] if i == 0 else None)
    p_train = num((summary.get("corpus") or {}).get("p_train"))
    if math.isfinite(p_train):
        ax.axhline(p_train, color="black", ls=":", lw=1.2, label=f"training text ({p_train:.3f})")
    ax.set_xticks(range(len(arms)), arms)
    ax.set(title="Share of top-100 corpus tokens in generations (95% CI)",
           ylabel="p (fraction of tokens)", xlabel="arm (light = before, dark = after)",
           xlim=(-0.5 - 0.5 / len(arms), len(arms) - 0.5 + 0.5 / len(arms)))  # narrow if 1 arm
    if ax.get_legend_handles_labels()[0]:  # a killed run has no p measured at all
        ax.legend()
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
    return _save(fig, path)


PLOTS = [  # (file stem, plotter, caption) in report order
    ("loss", _plot_loss, "Training loss per step; dots are held-out loss, open squares the "
     "forgetting probe's loss (general text never trained on), from eval rows."),
    ("loss_scatter", _plot_scatter, "One point per step: first arm's loss (x), another's (y)."),
    ("step_time", _plot_step_time, "Time per optimiser step; dashed lines are medians."),
    ("dw", _plot_dw, "Per-step update norm per layer (roles combined). The axis is logarithmic "
     "above the smallest update and linear below it, so a zero update (a frozen layer, or "
     "learning rate 0 at warm-up) is drawn on the bottom line, at 0."),
    ("dw0", _plot_dw0, "Drift from θ₀ at the last step, per layer and role (hatched grey: a "
     "matrix the arm never trains; blank: not tracked)."),
    ("p", _plot_p, "Top-100 corpus-token share in generations before and after training."),
]


def draw(rows: list[Row], summary: Summary, arms: list[str], out: Path
         ) -> list[tuple[str, Path, str]]:
    """Write every plot that applies into `out`: [(name, path, caption)] in report order."""
    drawn = []
    with plt.rc_context(_STYLE):
        for name, plot, caption in PLOTS:
            if not arms or (name == "loss_scatter" and len(arms) < 2):
                continue  # a paired scatter needs a second arm to pair with
            drawn.append((name, plot(rows, summary, arms, out / f"{name}.png"), caption))
    return drawn
