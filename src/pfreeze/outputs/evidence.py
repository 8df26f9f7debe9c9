"""The evidence report of a repeats run: every repeat's own report.html, and one combined
report over all repeats (evidence.html, evidence.md, evidence-curves.png,
evidence-scatter.png), rebuilt at any time from the repeats' files.

It gives, per arm, each headline figure as mean ± 95% CI in readable units; the paired
differences against the reference arm; the curves averaged over repeats with their bands; the
learning-vs-forgetting scatter; and the claims table (pfreeze.outputs.claims), whose verdicts
follow from the intervals. Repeats that have not finished (an interrupted run not yet resumed)
are left out and the report says so.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from pfreeze.atomic import write_json, write_text
from pfreeze.errors import PfreezeError
from pfreeze.outputs.claims import claims_table
from pfreeze.outputs.evidence_plots import plot_curves, plot_scatter
from pfreeze.outputs.figures import by_figure, figure_cells
from pfreeze.outputs.files import finished_repeats, is_repeats_dir, repeat_dirs
from pfreeze.outputs.repeats import aggregate, render_markdown
from pfreeze.outputs.report import _templates, metric_rows, render_report
from pfreeze.outputs.report_partial import read_config
from pfreeze.outputs.units import DASH

EVIDENCE_FILES = ("evidence.html", "evidence.md", "evidence-curves.png", "evidence-scatter.png")


def _uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _points(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"arm": arm, "moment": moment, "repeat": r,
             "learning": a.get(f"learning_{moment}"), "forgetting": a.get(f"forgetting_{moment}")}
            for r, s in enumerate(summaries) for arm, a in s["arms"].items()
            for moment in ("best", "after")]


def _what(first: dict[str, Any], planned: int, done: int) -> str:
    cfg = first.get("config") or {}
    t, data = cfg.get("training") or {}, cfg.get("data") or {}
    probe = (first.get("probe") or {}).get("source") or "off"
    return (f"{(first.get('model') or {}).get('name', DASH)} fine-tuned on "
            f"{(first.get('corpus') or {}).get('source', DASH)}: {done} of {planned} repeats "
            f"finished (repeat r uses seed training.seed + r); {t.get('max_steps', DASH)} steps "
            f"of batch {t.get('per_device_train_batch_size', DASH)} × "
            f"{data.get('block_size', DASH)} tokens, learning rate "
            f"{t.get('learning_rate', DASH)}; forgetting probe: {probe}.")


def _figure_rows(agg: dict[str, Any], part: str) -> tuple[list[str], list[dict[str, Any]]]:
    """One row per figure, one column per arm (per compared arm for the differences)."""
    cells = figure_cells(agg, part)
    return list(cells), [{"figure": r[0], "cells": r[1:]} for r in by_figure(list(cells.values()))]


def _context(root: Path, summaries: list[dict[str, Any]], agg: dict[str, Any],
             planned: int, runs: list[Path]) -> dict[str, Any]:
    first = summaries[0]
    env = first.get("environment") or {}
    done = len(summaries)
    partial = (f"Partial: {done} of {planned} repeats finished; the figures cover those. "
               f"`pfreeze run --resume {root}` finishes the rest." if done < planned else None)
    return {
        "title": f"pfreeze evidence: {(first.get('model') or {}).get('name', DASH)}, "
                 f"{done} repeats",
        "created": first.get("created", DASH), "command": first.get("command"),
        # The card's name where the run recorded one (figures compare within one card only).
        "device": env.get("device_name") or env.get("device") or DASH,
        "what": _what(first, planned, done),
        "partial": partial, "ref": agg["reference_arm"],
        "figures": _figure_rows(agg, "figures"),
        "diffs": _figure_rows(agg, "vs_reference"),
        "claims": claims_table(agg),
        "repeats": [{"name": p.name, "report": f"{p.name}/report.html"} for p in runs],
    }


def render_evidence(root: Path) -> dict[str, Path]:
    """Write repeats.json, repeats.md and the evidence report of the repeats in `root`.

    Raises PfreezeError when `root` holds no repeats or none of them has finished.
    """
    root = Path(root)
    runs = repeat_dirs(root) if root.is_dir() else []
    if not runs:
        raise PfreezeError(f"no repeats in {root} (no repeat-<r>/config.yaml)",
                           "pass the output_dir of a `pfreeze run` with repeats > 1")
    done = finished_repeats(root)
    planned = int(read_config(root / "config.yaml").get("repeats") or len(runs))
    summaries = [s for _, s in done]
    agg = aggregate(summaries)
    written = {"repeats_json": write_json(root / "repeats.json", agg),
               "repeats_md": write_text(root / "repeats.md", render_markdown(agg))}
    ctx = _context(root, summaries, agg, max(planned, len(runs)), [p for p, _ in done])
    arms = list(agg["arms"])
    curves = plot_curves([metric_rows(p / "metrics.jsonl") for p, _ in done], arms,
                         root / "evidence-curves.png")
    scatter = plot_scatter(_points(summaries), arms, root / "evidence-scatter.png")
    written.update(curves=curves, scatter=scatter)
    ctx["images"] = [
        {"file": curves.name, "uri": _uri(curves), "caption": "Training loss, held-out loss, "
         "probe loss and drift from θ₀, averaged over repeats; the band is the 95% CI."},
        {"file": scatter.name, "uri": _uri(scatter), "caption": "Learning (fall of held-out "
         "loss) against forgetting (rise of probe loss), per arm and repeat: filled circles at "
         "the arm's best step, open squares after the last step."}]
    env = _templates()
    for ext in ("md", "html"):
        text = env.get_template(f"evidence.{ext}.j2").render(**ctx)
        written[ext] = write_text(root / f"evidence.{ext}", text)
    return written


def render_repeats(root: Path) -> dict[str, Path]:
    """Every repeat's report (finished or not), then the evidence report over the finished."""
    written: dict[str, Path] = {}
    for run in repeat_dirs(Path(root)):
        if (run / "metrics.jsonl").is_file():
            written[f"{run.name} html"] = render_report(run)["html"]
    written.update(render_evidence(root))
    return written


def render_any(root: Path) -> dict[str, Path]:
    """What `pfreeze report` renders: a repeats run's reports and evidence, else one run's."""
    return render_repeats(root) if is_repeats_dir(root) else render_report(root)
