"""What the report knows about a run that did not finish.

An interrupted run (SIGINT/SIGTERM) writes summary.json with status "interrupted" and the
step it stopped at; fields only the end of a run can fill (p after, integrity, ...) may be
null. A killed run (SIGKILL) writes no summary.json at all, so its summary is rebuilt here
from the two files every run writes from its first step on: config.yaml and metrics.jsonl.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import yaml

from pfreeze.outputs.plots import Row, Summary, num

KILLED = "killed"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _finite(rows: list[Row], key: str) -> list[float]:
    return [v for v in (num(r.get(key)) for r in rows) if math.isfinite(v)]


def _arm_from_rows(rows: list[Row], kind: Any) -> dict[str, Any]:
    """An arm's summary fields that its logged rows can give (the rest stays missing)."""
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    losses = _finite(train, "loss")
    vals = [(r["step"], num(r.get("val_loss"))) for r in evals
            if math.isfinite(num(r.get("val_loss")))]
    best = min(vals, key=lambda sv: sv[1]) if vals else (None, None)
    return {
        "kind": kind,
        "steps": train[-1]["step"] if train else None,
        # Rows are logged every training.logging_steps, so a sum of their step times would
        # undercount the training time: only the median is given.
        "median_step_time_s": _median(_finite(train, "step_time_s")),
        "tokens_per_s": _median(_finite(train, "tokens_per_s")),
        "mean_loss": statistics.fmean(losses) if losses else None,
        "last_loss": losses[-1] if losses else None,
        "val_loss_before": vals[0][1] if vals else None,
        "val_loss_best": best[1], "val_loss_best_step": best[0],
        # "after" of a killed run: its latest evaluation
        "val_loss_after": vals[-1][1] if vals else None,
        "train_loss_after": num(evals[-1].get("train_loss")) if evals else None,
        **_probe_from_rows(evals, best[0]),
    }


def _probe_from_rows(evals: list[Row], best_step: Any) -> dict[str, Any]:
    """Probe loss before, at the best step and at the latest evaluation, where logged."""
    probe = {r["step"]: num(r.get("probe_loss")) for r in evals
             if math.isfinite(num(r.get("probe_loss")))}
    if not probe:
        return {}
    first, last = probe[min(probe)], probe[max(probe)]
    return {"probe_loss_before": first, "probe_loss_best": probe.get(best_step),
            "probe_loss_after": last, "forgetting_after": last - first}


def read_config(path: Path) -> dict[str, Any]:
    """The resolved config a run wrote first; {} where it is missing or unreadable."""
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def killed_summary(base: Summary, config: dict[str, Any], rows: list[Row]) -> Summary:
    """A summary for a killed run, from its config.yaml and metrics.jsonl rows.

    `base` is whatever summary.json held (a run can be killed before it lists arms).
    """
    kinds = {str(a.get("name") or a.get("kind")): a.get("kind")
             for a in config.get("arms") or [] if isinstance(a, dict)}
    names = list(dict.fromkeys([*kinds, *(str(r["arm"]) for r in rows)]))
    model, data = config.get("model") or {}, config.get("data") or {}
    return {
        **base, "status": KILLED, "config": base.get("config") or config,
        "model": base.get("model") or {"name": model.get("name")},
        "corpus": base.get("corpus") or {"source": data.get("corpus")},
        "arms": {n: _arm_from_rows([r for r in rows if str(r["arm"]) == n], kinds.get(n))
                 for n in names},
    }


def partial_note(summary: Summary, rows: list[Row], planned: str, had_summary: bool
                 ) -> str | None:
    """The line at the top of a report of a run that stopped early; None for other runs."""
    status = summary.get("status")
    if status not in ("interrupted", KILLED):
        return None
    last = max((r["step"] for r in rows if r.get("kind") == "train"), default=0)
    step = summary.get("interrupted_at_step")
    step = step if isinstance(step, int) else last
    where = f"step {step:,} of {planned}"
    head = (f"Partial: interrupted at {where}" if status == "interrupted" else
            f"Partial: the run was killed at {where} "
            + ("(summary.json lists no arms)" if had_summary else "(no summary.json)"))
    return (f"{head}. Tables and figures show the steps logged before it stopped; "
            "“after” values are its latest evaluation where known, and what only the end of "
            "a run measures (p after, integrity) is missing (—).")
