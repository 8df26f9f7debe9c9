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
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI without a display

import jinja2  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pfreeze.atomic import atomic_write, write_text  # noqa: E402
from pfreeze.errors import PfreezeError  # noqa: E402

DASH = "—"
SAMPLE_LINES = 40
TOP_TOKENS = 20
_KEY = re.compile(r"^L(\d+)\.(.+)$")  # tracked-matrix keys look like "L12.q"
# one place for the shared look, applied with rc_context so callers' settings are untouched
_STYLE = {"savefig.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 8}
_TAB10 = plt.get_cmap("tab10").colors  # arm i keeps colour i in every plot
Row = dict[str, Any]
Summary = dict[str, Any]


def _load(run_dir: Path) -> tuple[Summary, list[Row]]:
    summary_path, metrics_path = run_dir / "summary.json", run_dir / "metrics.jsonl"
    for path in (summary_path, metrics_path):
        if not path.is_file():
            raise PfreezeError(f"no pfreeze run in {run_dir} ({path.name} missing)",
                               "pass the output_dir of a finished or running `pfreeze run`")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PfreezeError(f"{summary_path} is not valid JSON ({exc})",
                           "re-run `pfreeze run` for this directory") from exc
    rows: list[Row] = []
    for line in metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a killed run can leave half a line at the end
        if isinstance(row, dict) and "arm" in row and isinstance(row.get("step"), int):
            rows.append(row)
    rows.sort(key=lambda r: r["step"])  # arms are interleaved; plots want step order
    return summary, rows


def _arm_names(summary: Summary, rows: list[Row]) -> list[str]:
    # summary order first: the first arm is the reference that others are compared to
    ordered = [str(a) for a in summary.get("arms") or {}] + [str(r["arm"]) for r in rows]
    return list(dict.fromkeys(ordered))


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def _rows(rows: list[Row], arm: str, kind: str) -> list[Row]:
    return [r for r in rows if str(r["arm"]) == arm and r.get("kind") == kind]


def _series(rows: list[Row], arm: str, kind: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of `key` for one arm, with missing (None) values dropped."""
    pts = [(r["step"], _num(r.get(key))) for r in _rows(rows, arm, kind)]
    xy = np.array([p for p in pts if math.isfinite(p[1])], dtype=float).reshape(-1, 2)
    return xy[:, 0], xy[:, 1]


def _split_key(key: str) -> tuple[int, str]:
    m = _KEY.match(key)
    return (int(m.group(1)), m.group(2)) if m else (-1, key)


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
    ax.set(title="Training loss (line, with moving average) and held-out loss (markers)",
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


def _plot_dw(rows: list[Row], summary: Summary, arms: list[str], path: Path) -> Path:
    fig, axes = _grid(len(arms), 2, 6.5, 4)
    layers = sorted({_split_key(k)[0] for r in rows for k in (r.get("dw") or {})} or {0})
    norm = matplotlib.colors.Normalize(min(layers), max(max(layers), min(layers) + 1))
    cmap = plt.get_cmap("viridis")
    for ax, arm in zip(axes, arms, strict=True):
        per_layer: dict[int, list[tuple[float, float]]] = {}
        for r in _rows(rows, arm, "train"):
            sq: dict[int, float] = {}
            for k, v in (r.get("dw") or {}).items():  # roles combine as one Frobenius norm
                sq[_split_key(k)[0]] = sq.get(_split_key(k)[0], 0.0) + np.nan_to_num(_num(v)) ** 2
            for layer, s in sq.items():
                per_layer.setdefault(layer, []).append((r["step"], math.sqrt(s)))
        for layer, pts in sorted(per_layer.items()):
            ax.plot(*zip(*pts, strict=True), color=cmap(norm(layer)), lw=1)
        if any(y > 0 for pts in per_layer.values() for _, y in pts):
            ax.set_yscale("log")  # updates span orders of magnitude across layers
        if not per_layer:
            ax.text(0.5, 0.5, "no tracked matrices", ha="center", transform=ax.transAxes)
        ax.set(title=f"{arm}: per-step update size", xlabel="step",
               ylabel=r"$\|W_t - W_{t-1}\|_F$ per layer")
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="layer",
                 ticks=matplotlib.ticker.MaxNLocator(integer=True))
    return _save(fig, path)


def _plot_dw0(rows: list[Row], summary: Summary, arms: list[str], path: Path) -> Path:
    last = {a: ([{}] + _rows(rows, a, "train"))[-1].get("dw0") or {} for a in arms}
    keys = [_split_key(k) for d in last.values() for k in d]
    layers = sorted({k[0] for k in keys}) or [0]
    roles = sorted({k[1] for k in keys}, key=lambda r: ("qkvo".find(r) % 10, r)) or [DASH]
    grids = {a: np.full((len(layers), len(roles)), np.nan) for a in arms}
    for a, d in last.items():
        for k, v in d.items():
            layer, role = _split_key(k)
            grids[a][layers.index(layer), roles.index(role)] = _num(v)
    vmax = max([np.nanmax(g) for g in grids.values() if np.isfinite(g).any()] + [1e-12])
    fig, axes = _grid(len(arms), 4, 3.2, max(3.0, 0.2 * len(layers) + 1.5))
    for ax, arm in zip(axes, arms, strict=True):
        # one colour scale for all arms, so frozen (0) and trained blocks compare at a glance
        image = ax.imshow(grids[arm], aspect="auto", cmap="magma", vmin=0, vmax=vmax)
        ax.set_xticks(range(len(roles)), roles)
        ax.set_yticks(range(len(layers)), [f"L{x}" if x >= 0 else "other" for x in layers],
                      fontsize=7)
        ax.set(title=f"{arm}: final drift from θ₀", xlabel="role")
        ax.grid(False)
    fig.colorbar(image, ax=axes, label=r"$\|W_T - W_0\|_F$")
    return _save(fig, path)


def _plot_p(rows: list[Row], summary: Summary, arms: list[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(arms) + 3), 4.5), layout="constrained")
    for i, arm in enumerate(arms):
        for j, key in enumerate(("p_before", "p_after")):
            p = ((summary.get("arms") or {}).get(arm) or {}).get(key) or {}
            mean, ci = _num(p.get("mean")), _ci(p)
            if math.isfinite(mean):
                err = [[mean - ci[0]], [ci[1] - mean]] if math.isfinite(sum(ci)) else None
                ax.bar(i + (j - 0.5) * 0.38, mean, 0.38, yerr=err, capsize=4, color=_TAB10[i % 10],
                       alpha=0.45 if j == 0 else 0.95, edgecolor="black",
                       label=key[2:] if i == 0 else None)
    p_train = _num((summary.get("corpus") or {}).get("p_train"))
    if math.isfinite(p_train):
        ax.axhline(p_train, color="black", ls=":", lw=1.2, label=f"training text ({p_train:.3f})")
    ax.set_xticks(range(len(arms)), arms)
    ax.set(title="Share of top-100 corpus tokens in generations (95% CI)",
           ylabel="p (fraction of tokens)", xlabel="arm (light = before, dark = after)",
           xlim=(-0.5 - 0.5 / len(arms), len(arms) - 0.5 + 0.5 / len(arms)))  # narrow if 1 arm
    ax.legend()
    return _save(fig, path)


PLOTS = [  # (file stem, plotter, caption) in report order
    ("loss", _plot_loss, "Training loss per step; markers are held-out loss from eval rows."),
    ("loss_scatter", _plot_scatter, "One point per step: first arm's loss (x), another's (y)."),
    ("step_time", _plot_step_time, "Time per optimiser step; dashed lines are medians."),
    ("dw", _plot_dw, "Per-step update norm per layer (roles combined); zeros (frozen) not drawn."),
    ("dw0", _plot_dw0, "Drift from θ₀ at the last step, per layer and role (blank: not tracked)."),
    ("p", _plot_p, "Top-100 corpus-token share in generations before and after training."),
]


def _f(x: Any, digits: int = 3) -> str:
    v = _num(x)
    return f"{v:.{digits}f}" if math.isfinite(v) else DASH


def _int(x: Any) -> str:
    return f"{round(_num(x)):,}" if math.isfinite(_num(x)) else DASH


def _ci(p: dict[str, Any]) -> tuple[float, float]:
    ci = p.get("ci95")
    return (_num(ci[0]), _num(ci[1])) if isinstance(ci, list) and len(ci) == 2 else (math.nan,) * 2


def _p(p: Any) -> str:
    p = p or {}
    half = (_ci(p)[1] - _ci(p)[0]) / 2
    return f"{_f(p.get('mean'))} ± {_f(half)}" if math.isfinite(half) else _f(p.get("mean"))


def _token(tok: Any) -> str:
    # leading spaces carry meaning in BPE tokens but are invisible, so draw them as "␣"
    return json.dumps(str(tok), ensure_ascii=False)[1:-1].replace('\\"', '"').replace(" ", "␣")


def _find(tree: Any, *names: str) -> Any:
    """First value under any of `names` anywhere in the nested config (its layout may change)."""
    if isinstance(tree, dict):
        for name in names:
            if tree.get(name) is not None and not isinstance(tree[name], dict):
                return tree[name]
        for v in tree.values():
            if (hit := _find(v, *names)) is not None:
                return hit
    return None


def _arm_row(arm: str, a: dict[str, Any], total: Any, ref_median: float) -> dict[str, str]:
    gap = _num(a.get("val_loss_after")) - _num(a.get("train_loss_after"))
    ratio = _num(a.get("median_step_time_s")) / ref_median if ref_median else math.nan
    pct = 100 * _num(a.get("trainable_params")) / (_num(a.get("total_params") or total) or math.nan)
    best = f"{_f(a.get('val_loss_best'))} (step {_int(a.get('val_loss_best_step'))})"
    return {
        "arm": arm,
        "trainable": _int(a.get("trainable_params"))
        + (f" ({pct:.3g}%)" if pct < 1 else f" ({pct:.1f}%)" if math.isfinite(pct) else ""),
        "steps": _int(a.get("steps")), "time": f"{_f(a.get('total_time_s'), 1)} s",
        "median": f"{_f(a.get('median_step_time_s'))} s",
        "ratio": f"{ratio:.2f}×" if math.isfinite(ratio) else DASH,
        "tps": _int(a.get("tokens_per_s")), "gap": _f(gap),
        "mean_loss": _f(a.get("mean_loss")), "last_loss": _f(a.get("last_loss")),
        "val": f"{_f(a.get('val_loss_before'))} → {best} → {_f(a.get('val_loss_after'))}",
        "p": f"{_p(a.get('p_before'))} → {_p(a.get('p_after'))}"
        # keep_best runs also sample with the best-point weights
        + (f" (best point: {_p(a['p_best'])})" if a.get("p_best") else ""),
    }


def _cache(arm: str, c: dict[str, Any]) -> dict[str, str]:
    f = c["blocks_cached"]
    return {"arm": arm, "text": f"blocks 0–{f - 1} of {c.get('of', DASH)} computed once per "
            f"chunk and read back after: {_int(c.get('misses'))} windows computed, "
            f"{_int(c.get('hits'))} read back since the process started "
            f"({_f(c.get('mib'), 1)} MiB); step times of windows read back skip those blocks"}


def _sample_excerpt(lines: list[str]) -> str:
    """The first sample of each (arm, moment): shows what training changed, arm by arm."""
    blocks: list[list[str]] = []
    for line in lines:
        if line.startswith("=== ") or not blocks:
            blocks.append([])
        blocks[-1].append(line)
    seen, keep = set(), []
    for block in blocks:
        head = block[0].split(" prompt=")[0]  # "=== arm=X moment=Y"
        if head not in seen:
            seen.add(head)
            keep.append("\n".join(block).rstrip())
    text = "\n\n".join(keep)
    return text if len(text.splitlines()) <= 4 * SAMPLE_LINES else "\n".join(
        text.splitlines()[: 4 * SAMPLE_LINES]) + "\n…"


def _integrity(arm: str, a: dict[str, Any]) -> dict[str, Any]:
    integ = a.get("integrity")
    if not integ:
        full = a.get("kind") == "full" or a.get("trainable_params") == a.get("total_params")
        text = "all parameters trainable; nothing frozen to check" if full else "not checked"
        return {"arm": arm, "ok": None, "text": text}
    if integ.get("ok") and not integ.get("checked_elements"):
        return {"arm": arm, "ok": True, "text": "all parameters trainable; nothing frozen to check"}
    if integ.get("ok"):
        return {"arm": arm, "ok": True, "text": "frozen elements bit-identical to θ₀: "
                f"{_int(integ.get('checked_elements'))} checked "
                f"({_int(integ.get('frozen_tensors'))} tensors), OK"}
    bad = [str(v) for v in integ.get("violations") or []]
    listed = (": " + ", ".join(bad[:5]) + (" …" if len(bad) > 5 else "")) if bad else ""
    return {"arm": arm, "ok": False, "text": "VIOLATION: frozen parameters changed during "
            f"training ({len(bad)} tensors{listed})"}


def _context(run_dir: Path, summary: Summary, arms: list[str]) -> dict[str, Any]:
    info: dict[str, dict[str, Any]] = {a: (summary.get("arms") or {}).get(a) or {} for a in arms}
    model, corpus = summary.get("model") or {}, summary.get("corpus") or {}
    config, total = summary.get("config") or {}, model.get("total_params")
    done = max((_num(a.get("steps")) for a in info.values() if a.get("steps")), default=None)
    planned = _find(config, "max_steps", "steps")
    batch = _find(config, "per_device_train_batch_size", "batch_size") or DASH
    accum = _num(_find(config, "gradient_accumulation_steps"))
    accum = f" × {accum:g} accumulation steps" if accum > 1 else ""
    steps = _int(done) + (f" of {_int(planned)} planned" if planned and planned != done else "")
    described = "; ".join(f"{a} ({info[a].get('description') or info[a].get('kind') or DASH})"
                          for a in arms)
    what = (f"{model.get('name', DASH)} ({model.get('architecture', DASH)}, "
            f"{_int(model.get('n_layers'))} layers, {_int(total)} parameters) was fine-tuned on "
            f"{corpus.get('source', DASH)} with {len(arms)} arm(s) trained side by side on the "
            f"same batches: {described}. Steps: {steps}; batch size: {batch}{accum}; window: "
            f"{_find(config, 'block_size', 'seq_len') or DASH} tokens; learning rate: "
            f"{_find(config, 'learning_rate', 'lr') or DASH}.")
    hashes = {a: info[a].get("theta0_hash") for a in arms}
    known = {h for h in hashes.values() if h}
    theta_ok = len(known) == 1 and all(hashes.values())
    theta_note = ("all arms started from the same θ₀" if theta_ok else
                  "WARNING: arms started from different θ₀; the comparison is not paired"
                  if len(known) > 1 else "WARNING: θ₀ hash not recorded for every arm")
    n_total = _num(corpus.get("n_total")) or math.nan  # no share column from a zero total
    top = [{"rank": i + 1, "id": t.get("id", DASH), "token": _token(t.get("token")),
            "count": _int(t.get("count")), "share": _f(100 * _num(t.get("count")) / n_total, 2)}
           for i, t in enumerate((corpus.get("top") or [])[:TOP_TOKENS])]
    sp = run_dir / "samples.txt"
    lines = sp.read_text(encoding="utf-8", errors="replace").splitlines() if sp.is_file() else []
    samples = _sample_excerpt(lines)
    env = {"pfreeze": summary.get("pfreeze_version"), **(summary.get("environment") or {}),
           **(summary.get("execution") or {})}
    return {
        "title": f"pfreeze report: {model.get('name', DASH)} on {corpus.get('source', DASH)}",
        "created": summary.get("created", DASH), "status": summary.get("status", DASH),
        "command": summary.get("command"), "what": what, "ref": arms[0] if arms else DASH,
        "arms": [_arm_row(a, info[a], total, _num(info[arms[0]].get("median_step_time_s")))
                 for a in arms],
        "integrity": [_integrity(a, info[a]) for a in arms if info[a]],
        "caches": [_cache(a, info[a]["prefix_cache"]) for a in arms
                   if (info[a].get("prefix_cache") or {}).get("blocks_cached")],
        "hashes": [{"arm": a, "hash": h or DASH} for a, h in hashes.items()],
        "theta_note": theta_note, "theta_ok": theta_ok,
        "corpus": [("source", corpus.get("source", DASH)), ("N_total", _int(n_total)),
                   ("N_unique", _int(corpus.get("n_unique"))),
                   ("train tokens", _int(corpus.get("n_train"))),
                   ("val tokens", _int(corpus.get("n_val"))),
                   ("p of training text (top-100 share)", _f(corpus.get("p_train"))),
                   ("p of validation text", _f(corpus.get("p_val")))],
        "top": top,
        "environment": [(k, DASH if v is None else str(v)) for k, v in env.items()],
        "samples": samples,
    }


def render_report(run_dir: Path) -> dict[str, Path]:
    """Write the plots, report.md and report.html into `run_dir`.

    Returns {kind: path}: one key per plot ("loss", "loss_scatter", "step_time", "dw", "dw0",
    "p"; loss_scatter only with two or more arms), then "md" and "html". Raises PfreezeError
    when `run_dir` holds no summary.json or metrics.jsonl.
    """
    run_dir = Path(run_dir)
    summary, rows = _load(run_dir)
    arms = _arm_names(summary, rows)
    ctx = _context(run_dir, summary, arms)
    written: dict[str, Path] = {}
    ctx["figures"] = []
    with plt.rc_context(_STYLE):
        for name, plot, caption in PLOTS:
            if not arms or (name == "loss_scatter" and len(arms) < 2):
                continue  # a paired scatter needs a second arm to pair with
            path = written[name] = plot(rows, summary, arms, run_dir / f"{name}.png")
            uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
            ctx["figures"].append({"file": path.name, "caption": caption, "uri": uri})
    env = jinja2.Environment(  # StrictUndefined: a template typo fails loudly, not blank
        loader=jinja2.PackageLoader("pfreeze", "templates"), undefined=jinja2.StrictUndefined,
        autoescape=lambda name: bool(name and name.endswith(".html.j2")),
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    # a "|" inside a cell would split a Markdown table row
    env.filters["md"] = lambda v: str(v).replace("|", "\\|").replace("\n", " ")
    for ext in ("md", "html"):
        text = env.get_template(f"report.{ext}.j2").render(**ctx)
        written[ext] = write_text(run_dir / f"report.{ext}", text)
    return written
