"""Turn a pfreeze run directory into plots, report.md and a self-contained report.html.

Everything is read from metrics.jsonl and summary.json, so a report can be rebuilt at any
time, including for a run that is still going or was killed. Numbers are formatted once, in
`_context`, and both templates only lay them out; that keeps the Markdown and HTML in step.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI without a display

import jinja2  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pfreeze.atomic import atomic_write, write_text  # noqa: E402
from pfreeze.errors import PfreezeError  # noqa: E402

DASH = "—"
DPI = 110
SAMPLE_LINES = 40
TOP_TOKENS = 20
_KEY = re.compile(r"^L(\d+)\.(.+)$")  # tracked-matrix keys look like "L12.q"

Row = dict[str, Any]


# ---------------------------------------------------------------- loading


def _no_run(run_dir: Path, missing: str) -> PfreezeError:
    return PfreezeError(
        f"no pfreeze run in {run_dir} ({missing} missing)",
        "pass the output_dir of a finished or running `pfreeze run`",
    )


def _load(run_dir: Path) -> tuple[dict[str, Any], list[Row]]:
    summary_path, metrics_path = run_dir / "summary.json", run_dir / "metrics.jsonl"
    for path in (summary_path, metrics_path):
        if not path.is_file():
            raise _no_run(run_dir, path.name)
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PfreezeError(
            f"{summary_path} is not valid JSON ({exc})", "re-run `pfreeze run` for this directory"
        ) from exc
    rows: list[Row] = []
    for line in metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a killed run can leave half a line at the end
        if isinstance(row, dict) and "arm" in row:
            rows.append(row)
    return summary, rows


def _arm_names(summary: dict[str, Any], rows: list[Row]) -> list[str]:
    # summary order first: the first arm is the reference that others are compared to
    names = list(summary.get("arms") or {})
    for row in rows:
        if str(row["arm"]) not in names:
            names.append(str(row["arm"]))
    return names


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def _series(rows: list[Row], arm: str, kind: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = sorted(
        (int(r["step"]), _num(r.get(key)))
        for r in rows
        if r.get("arm") == arm and r.get("kind") == kind and isinstance(r.get("step"), int)
    )
    return np.array([p[0] for p in pts], dtype=float), np.array([p[1] for p in pts], dtype=float)


def _train_rows(rows: list[Row], arm: str) -> list[Row]:
    out = [r for r in rows if r.get("arm") == arm and r.get("kind") == "train"]
    return sorted(out, key=lambda r: _num(r.get("step")))


def _split_key(key: str) -> tuple[int, str]:
    m = _KEY.match(key)
    return (int(m.group(1)), m.group(2)) if m else (-1, key)


# ---------------------------------------------------------------- plots


def _colour(i: int) -> Any:
    return plt.get_cmap("tab10")(i % 10)


def _save(fig: Figure, path: Path) -> Path:
    # format is explicit because atomic_write hands savefig a ".tmp" name
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=DPI))
    plt.close(fig)
    return path


def _moving_average(y: np.ndarray) -> tuple[np.ndarray, int]:
    w = max(3, min(50, len(y) // 15))
    if len(y) < 2 * w:
        return np.array([]), w
    return np.convolve(y, np.ones(w) / w, mode="valid"), w


def _plot_loss(rows: list[Row], arms: list[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 5), layout="constrained")
    for i, arm in enumerate(arms):
        x, y = _series(rows, arm, "train", "loss")
        ok = np.isfinite(y)
        ax.plot(x[ok], y[ok], color=_colour(i), lw=1.3, label=f"{arm} train")
        ma, w = _moving_average(y[ok])
        if ma.size:  # a wide faint band shows the trend without hiding the raw curve
            ax.plot(x[ok][w - 1 :], ma, color=_colour(i), lw=5, alpha=0.25, zorder=1)
        vx, vy = _series(rows, arm, "eval", "val_loss")
        ok = np.isfinite(vy)
        if ok.any():
            ax.plot(vx[ok], vy[ok], "o", color=_colour(i), mec="black", ms=7, label=f"{arm} val")
    ax.set(title="Training loss (line) and held-out loss (markers)", xlabel="step",
           ylabel="cross-entropy loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def _plot_scatter(rows: list[Row], arms: list[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 6), layout="constrained")
    ref = dict(zip(*_series(rows, arms[0], "train", "loss"), strict=True))
    lo, hi = math.inf, -math.inf
    for i, arm in enumerate(arms[1:], start=1):
        pairs = [(ref.get(s, math.nan), v) for s, v in zip(*_series(rows, arm, "train", "loss"),
                                                            strict=True)]
        xy = np.array([p for p in pairs if math.isfinite(p[0]) and math.isfinite(p[1])])
        if xy.size:
            ax.scatter(xy[:, 0], xy[:, 1], s=18, alpha=0.7, color=_colour(i), label=arm)
            lo, hi = min(lo, xy.min()), max(hi, xy.max())
    if math.isfinite(lo):
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
        ax.legend(fontsize=8)
    ax.set(title=f"Paired loss per step (below the line: lower loss than {arms[0]})",
           xlabel=f"{arms[0]} loss at step k (nats/token)", ylabel="arm loss at step k (nats/token)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _plot_step_time(rows: list[Row], arms: list[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 4.5), layout="constrained")
    for i, arm in enumerate(arms):
        x, y = _series(rows, arm, "train", "step_time_s")
        ok = np.isfinite(y)
        if not ok.any():
            continue
        ax.plot(x[ok], y[ok], color=_colour(i), lw=1.2, label=arm)
        med = float(np.median(y[ok]))
        ax.axhline(med, color=_colour(i), ls="--", lw=1, label=f"{arm} median {med:.3g} s")
    ax.set(title="Wall-clock time per optimiser step", xlabel="step", ylabel="step time (s)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def _grid(n: int, ncols: int, w: float, h: float) -> tuple[Figure, list[Any]]:
    cols = min(n, ncols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False, layout="constrained")
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _plot_dw(rows: list[Row], arms: list[str], path: Path) -> Path:
    fig, axes = _grid(len(arms), 2, 6.5, 4)
    layers = sorted({_split_key(k)[0] for r in rows for k in (r.get("dw") or {})} or {0})
    norm = Normalize(min(layers), max(max(layers), min(layers) + 1))
    cmap = plt.get_cmap("viridis")
    for ax, arm in zip(axes, arms, strict=True):
        per_layer: dict[int, list[tuple[float, float]]] = {}
        for r in _train_rows(rows, arm):
            sq: dict[int, float] = {}
            for k, v in (r.get("dw") or {}).items():
                layer = _split_key(k)[0]
                sq[layer] = sq.get(layer, 0.0) + (_num(v) ** 2 if math.isfinite(_num(v)) else 0.0)
            for layer, s in sq.items():  # roles combine as one Frobenius norm per layer
                per_layer.setdefault(layer, []).append((_num(r.get("step")), math.sqrt(s)))
        positive = False
        for layer, pts in sorted(per_layer.items()):
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, color=cmap(norm(layer)), lw=1)
            positive = positive or any(y > 0 for y in ys)
        if positive:
            ax.set_yscale("log")
        if not per_layer:
            ax.text(0.5, 0.5, "no tracked matrices", ha="center", transform=ax.transAxes)
        ax.set(title=f"{arm}: per-step update size", xlabel="step", ylabel="‖W_t − W_{t−1}‖_F")
        ax.grid(alpha=0.3)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="layer")
    return _save(fig, path)


def _plot_dw0(rows: list[Row], arms: list[str], path: Path) -> Path:
    last = {a: (_train_rows(rows, a) or [{}])[-1].get("dw0") or {} for a in arms}
    keys = [_split_key(k) for d in last.values() for k in d]
    layers = sorted({k[0] for k in keys}) or [0]
    roles = sorted({k[1] for k in keys}, key=lambda r: ("qkvo".find(r) % 10, r)) or ["—"]
    grids = {a: np.full((len(layers), len(roles)), np.nan) for a in arms}
    for a, d in last.items():
        for k, v in d.items():
            layer, role = _split_key(k)
            grids[a][layers.index(layer), roles.index(role)] = _num(v)
    vmax = max([np.nanmax(g) for g in grids.values() if np.isfinite(g).any()] + [1e-12])
    fig, axes = _grid(len(arms), 4, 3.2, max(3.0, 0.2 * len(layers) + 1.5))
    image = None
    for ax, arm in zip(axes, arms, strict=True):
        # one colour scale for all arms, so frozen (0) and trained blocks compare at a glance
        image = ax.imshow(grids[arm], aspect="auto", cmap="magma", vmin=0, vmax=vmax)
        ax.set_xticks(range(len(roles)), roles)
        ax.set_yticks(range(len(layers)), [f"L{x}" for x in layers], fontsize=7)
        ax.set(title=f"{arm}: final ‖W_T − W_0‖_F", xlabel="role")
    fig.colorbar(image, ax=axes, label="‖W_T − W_0‖_F")
    return _save(fig, path)


def _plot_p(summary: dict[str, Any], arms: list[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(arms) + 3), 4.5), layout="constrained")
    info = summary.get("arms") or {}
    for i, arm in enumerate(arms):
        for j, (key, label) in enumerate((("p_before", "before"), ("p_after", "after"))):
            p = (info.get(arm) or {}).get(key) or {}
            mean = _num(p.get("mean"))
            if not math.isfinite(mean):
                continue
            ci = p.get("ci95") or [mean, mean]
            err = [[mean - _num(ci[0])], [_num(ci[1]) - mean]]
            ax.bar(i + (j - 0.5) * 0.38, mean, 0.38, yerr=err, capsize=4, color=_colour(i),
                   alpha=0.45 if j == 0 else 0.95, edgecolor="black",
                   label=label if i == 0 else None)
    p_train = _num((summary.get("corpus") or {}).get("p_train"))
    if math.isfinite(p_train):
        ax.axhline(p_train, color="black", ls=":", lw=1.2, label=f"training text ({p_train:.3f})")
    ax.set_xticks(range(len(arms)), arms)
    ax.set(title="Share of top-100 corpus tokens in generations (95% CI)",
           ylabel="p (fraction of tokens)", xlabel="arm (light = before, dark = after)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------- formatting


def _f(x: Any, digits: int = 3) -> str:
    v = _num(x)
    return f"{v:.{digits}f}" if math.isfinite(v) else DASH


def _int(x: Any) -> str:
    return f"{int(x):,}" if math.isfinite(_num(x)) else DASH


def _pct(part: Any, whole: Any) -> str:
    pct = 100 * _num(part) / _num(whole) if _num(whole) else math.nan
    if not math.isfinite(pct):
        return ""
    return f" ({pct:.3g}%)" if pct < 1 else f" ({pct:.1f}%)"


def _p(p: Any) -> str:
    p = p or {}
    ci = p.get("ci95") or [None, None]
    half = (_num(ci[1]) - _num(ci[0])) / 2
    return f"{_f(p.get('mean'))} ± {_f(half)}" if math.isfinite(half) else _f(p.get("mean"))


def _find(tree: Any, *names: str) -> Any:
    """First value under any of `names` anywhere in the nested config (its layout may change)."""
    if isinstance(tree, dict):
        for name in names:
            if tree.get(name) is not None:
                return tree[name]
        for v in tree.values():
            if (hit := _find(v, *names)) is not None:
                return hit
    return None


def _arm_row(arm: str, a: dict[str, Any], total: Any, ref_median: float) -> dict[str, str]:
    gap = _num(a.get("val_loss_after")) - _num(a.get("train_loss_after"))
    ratio = _num(a.get("median_step_time_s")) / ref_median if ref_median else math.nan
    best = f"{_f(a.get('val_loss_best'))} (step {_int(a.get('val_loss_best_step'))})"
    return {
        "arm": arm,
        "trainable": _int(a.get("trainable_params"))
        + _pct(a.get("trainable_params"), a.get("total_params") or total),
        "steps": _int(a.get("steps")),
        "time": f"{_f(a.get('total_time_s'), 1)} s",
        "median": f"{_f(a.get('median_step_time_s'))} s",
        "ratio": f"{ratio:.2f}×" if math.isfinite(ratio) else DASH,
        "tps": _f(a.get("tokens_per_s"), 0),
        "mean_loss": _f(a.get("mean_loss")),
        "last_loss": _f(a.get("last_loss")),
        "val": f"{_f(a.get('val_loss_before'))} → {best} → {_f(a.get('val_loss_after'))}",
        "gap": _f(gap) if math.isfinite(gap) else DASH,
        "p": f"{_p(a.get('p_before'))} → {_p(a.get('p_after'))}",
    }


def _integrity(arm: str, a: dict[str, Any]) -> dict[str, Any]:
    integ = a.get("integrity")
    if not integ:
        full = a.get("kind") == "full" or a.get("trainable_params") == a.get("total_params")
        text = "all parameters trainable; nothing frozen to check" if full else "not checked"
        return {"arm": arm, "ok": None, "text": text}
    if integ.get("ok"):
        text = (f"frozen elements bit-identical to θ₀: {_int(integ.get('checked_elements'))} "
                f"checked in {_int(integ.get('frozen_tensors'))} tensors, OK")
        return {"arm": arm, "ok": True, "text": text}
    bad = [str(v) for v in integ.get("violations") or []]
    text = (f"VIOLATION: frozen parameters changed during training ({len(bad)} tensors"
            + (f": {', '.join(bad[:5])}" + (" …" if len(bad) > 5 else "") if bad else "") + ")")
    return {"arm": arm, "ok": False, "text": text}


def _context(run_dir: Path, summary: dict[str, Any], arms: list[str]) -> dict[str, Any]:
    info: dict[str, dict[str, Any]] = {a: (summary.get("arms") or {}).get(a) or {} for a in arms}
    model, corpus = summary.get("model") or {}, summary.get("corpus") or {}
    config, total = summary.get("config") or {}, model.get("total_params")
    ref_median = _num(info[arms[0]].get("median_step_time_s")) if arms else math.nan
    steps = _find(config, "steps", "max_steps", "n_steps") or max(
        (a.get("steps") or 0 for a in info.values()), default=None)
    described = ", ".join(f"{a} ({info[a].get('description') or info[a].get('kind') or DASH})"
                          for a in arms)
    what = (f"Model {model.get('name', DASH)} ({model.get('architecture', DASH)}, "
            f"{_int(model.get('n_layers'))} layers, {_int(total)} parameters) was fine-tuned on "
            f"{corpus.get('source', DASH)} with {len(arms)} arm(s) trained side by side on "
            f"identical batches: {described}. Steps: {_int(steps)}; batch size: "
            f"{_find(config, 'batch_size') or DASH}; sequence length: "
            f"{_find(config, 'seq_len', 'max_seq_len', 'block_size') or DASH}; learning rate: "
            f"{_find(config, 'lr', 'learning_rate') or DASH}. Status: "
            f"{summary.get('status', DASH)}.")
    hashes = {a: info[a].get("theta0_hash") for a in arms}
    known = {h for h in hashes.values() if h}
    if len(known) == 1 and all(hashes.values()):
        theta_note, theta_ok = "all arms started from the same θ₀", True
    elif len(known) > 1:
        theta_note, theta_ok = "WARNING: arms started from different θ₀; not a paired run", False
    else:
        theta_note, theta_ok = "WARNING: θ₀ hash not recorded for every arm", False
    n_total = _num(corpus.get("n_total"))
    top = [{"rank": i + 1, "id": t.get("id", DASH), "token": json.dumps(t.get("token"))[1:-1],
            "count": _int(t.get("count")),
            "share": f"{100 * _num(t.get('count')) / n_total:.2f}%" if n_total else DASH}
           for i, t in enumerate((corpus.get("top") or [])[:TOP_TOKENS])]
    samples_path = run_dir / "samples.txt"
    samples = None
    if samples_path.is_file():
        lines = samples_path.read_text(encoding="utf-8", errors="replace").splitlines()
        samples = "\n".join(lines[:SAMPLE_LINES]) + ("\n…" if len(lines) > SAMPLE_LINES else "")
    env = summary.get("environment") or {}
    return {
        "title": f"pfreeze report: {model.get('name', DASH)} on {corpus.get('source', DASH)}",
        "created": summary.get("created", DASH), "status": summary.get("status", DASH),
        "command": summary.get("command"), "what": what, "ref": arms[0] if arms else DASH,
        "arms": [_arm_row(a, info[a], total, ref_median) for a in arms],
        "integrity": [_integrity(a, info[a]) for a in arms if info[a]],
        "hashes": [{"arm": a, "hash": h or DASH} for a, h in hashes.items()],
        "theta_note": theta_note, "theta_ok": theta_ok,
        "corpus": [("source", corpus.get("source", DASH)), ("N_total", _int(n_total)),
                   ("N_unique", _int(corpus.get("n_unique"))),
                   ("train tokens", _int(corpus.get("n_train"))),
                   ("val tokens", _int(corpus.get("n_val"))),
                   ("p of training text (top-100 share)", _f(corpus.get("p_train"))),
                   ("p of validation text", _f(corpus.get("p_val")))],
        "top": top,
        "environment": [(k, DASH if v is None else str(v)) for k, v in
                        {"pfreeze": summary.get("pfreeze_version"), **env}.items()],
        "samples": samples,
    }


# ---------------------------------------------------------------- entry point

FIGURES: list[tuple[str, str]] = [
    ("loss", "Training loss per step; markers are held-out loss from eval rows."),
    ("loss_scatter", "Each point is one step: the reference arm's loss against another arm's."),
    ("step_time", "Time per optimiser step; dashed lines are medians."),
    ("dw", "Per-step update norm per layer (roles combined), coloured by layer."),
    ("dw0", "Total drift from θ₀ at the last step, per layer and role."),
    ("p", "Top-100 corpus-token share in generations before and after training."),
]


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_report(run_dir: Path) -> dict[str, Path]:
    """Write the plots, report.md and report.html into `run_dir`.

    Returns {file name: path}, e.g. {"loss.png": ..., "report.md": ..., "report.html": ...};
    loss_scatter.png is left out when the run has a single arm.
    """
    run_dir = Path(run_dir)
    summary, rows = _load(run_dir)
    arms = _arm_names(summary, rows)
    plotters: dict[str, Callable[[Path], Path]] = {
        "loss": lambda p: _plot_loss(rows, arms, p),
        "step_time": lambda p: _plot_step_time(rows, arms, p),
        "dw": lambda p: _plot_dw(rows, arms, p),
        "dw0": lambda p: _plot_dw0(rows, arms, p),
        "p": lambda p: _plot_p(summary, arms, p),
    }
    if len(arms) > 1:  # a paired scatter needs a second arm to pair with
        plotters["loss_scatter"] = lambda p: _plot_scatter(rows, arms, p)
    written = {f"{n}.png": plotters[n](run_dir / f"{n}.png") for n, _ in FIGURES
               if n in plotters and arms}
    ctx = _context(run_dir, summary, arms)
    ctx["figures"] = [
        {"name": n, "file": f"{n}.png", "caption": c, "uri": "data:image/png;base64,"
         + base64.b64encode(written[f"{n}.png"].read_bytes()).decode()}
        for n, c in FIGURES if f"{n}.png" in written
    ]
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pfreeze", "templates"),
        autoescape=lambda name: bool(name and name.endswith(".html.j2")),
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,  # a template typo should fail loudly, not go blank
    )
    env.filters["md"] = _md_cell
    for name in ("md", "html"):
        text = env.get_template(f"report.{name}.j2").render(**ctx)
        written[f"report.{name}"] = write_text(run_dir / f"report.{name}", text)
    return written
