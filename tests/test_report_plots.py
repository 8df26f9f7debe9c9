"""What the ‖ΔW‖ plots draw, read from the matplotlib figures themselves (not from pixels)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.figure import Figure

from pfreeze.outputs import plots

KEYS = [f"L{layer}.{role}" for layer in range(2) for role in "qv"]


def _train(arm: str, step: int, dw: dict[str, float], dw0: dict[str, float]) -> dict[str, Any]:
    return {"kind": "train", "step": step, "arm": arm, "loss": 3.0, "dw": dw, "dw0": dw0}


def _figure(monkeypatch: pytest.MonkeyPatch, plotter: Any, rows: list[dict[str, Any]],
            summary: dict[str, Any], arms: list[str], tmp_path: Path) -> Figure:
    """Run one plotter and keep the figure it would have saved."""
    kept: list[Figure] = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: kept.append(fig) or path)
    plotter(rows, summary, arms, tmp_path / "x.png")
    return kept[0]


def test_a_zero_update_at_step_1_stays_on_the_dw_axis(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    # warm-up starts at lr 0: every matrix moves by exactly 0 at step 1, then by ~1e-3
    rows = [_train("full", s, {k: 0.0 if s == 1 else 1e-3 * s for k in KEYS}, {})
            for s in (1, 2, 3)]
    fig = _figure(monkeypatch, plots._plot_dw, rows, {}, ["full"], tmp_path)
    ax = fig.axes[0]
    assert ax.get_yscale() == "symlog"  # a log axis would drop the zero
    lines = [line for line in ax.get_lines() if len(line.get_xdata())]
    assert lines and all(line.get_xdata()[0] == 1 and line.get_ydata()[0] == 0 for line in lines)
    # the zero is inside the drawn range, not clipped below it
    assert ax.get_ylim()[0] <= 0 < ax.get_ylim()[1]
    caption = dict((n, c) for n, _, c in plots.PLOTS)["dw"]
    assert "zero" in caption and "at 0" in caption


def _frozen_cells(ax: Any) -> set[tuple[int, int]]:
    """(layer row, role column) of every hatched cell in a dw0 panel."""
    return {(round(p.get_y() + 0.5), round(p.get_x() + 0.5)) for p in ax.patches
            if p.get_hatch()}


def _dw0_rows() -> list[dict[str, Any]]:
    # arm "plan": L0 never moves; L1.q moves; L1.v moved and came back to exactly θ₀
    rows = []
    for s in (1, 2, 3):
        dw0 = {"L0.q": 0.0, "L0.v": 0.0, "L1.q": 0.1 * s, "L1.v": 0.05 if s == 2 else 0.0}
        rows.append(_train("full", s, {k: 0.1 for k in KEYS}, {k: 0.1 * s for k in KEYS}))
        rows.append(_train("plan", s, dict.fromkeys(KEYS, 0.0), dw0))
    return rows


@pytest.mark.parametrize("listed", [True, False], ids=["tracked_frozen", "fallback"])
def test_frozen_cells_are_hatched_and_zero_drift_is_not(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path, listed: bool) -> None:
    rows = _dw0_rows()
    summary = {"arms": {"full": {"tracked_frozen": []}, "plan": {
        "tracked_frozen": ["L0.q", "L0.v"]}}} if listed else {}
    fig = _figure(monkeypatch, plots._plot_dw0, rows, summary, ["full", "plan"], tmp_path)
    full, plan = fig.axes[:2]
    assert _frozen_cells(full) == set()
    assert _frozen_cells(plan) == {(0, 0), (0, 1)}  # L0.q and L0.v
    grid = np.ma.getdata(plan.images[0].get_array())
    mask = np.ma.getmaskarray(plan.images[0].get_array()) | np.isnan(grid)
    # frozen cells are left out of the colour map; the trained L1.v at drift 0 is in it, at 0
    assert mask[0].all() and not mask[1].any() and grid[1, 1] == 0.0
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert labels == ["frozen (never trains)"]


def test_tracked_frozen_wins_over_the_zero_fallback(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    # Only summary.json can tell a trained matrix that never moved from a frozen one.
    rows = _dw0_rows()
    summary = {"arms": {"plan": {"tracked_frozen": ["L0.q"]}}}
    fig = _figure(monkeypatch, plots._plot_dw0, rows, summary, ["full", "plan"], tmp_path)
    assert _frozen_cells(fig.axes[1]) == {(0, 0)}
    assert plots.frozen_keys(rows, {}, "plan") == {"L0.q", "L0.v"}
