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

import jinja2
from markupsafe import Markup, escape

from pfreeze.atomic import write_text
from pfreeze.errors import PfreezeError
from pfreeze.outputs.loggers import read_jsonl
from pfreeze.outputs.plots import DASH, Row, Summary, draw, num
from pfreeze.outputs.report_partial import killed_summary, partial_note, read_config
from pfreeze.outputs.units import fmt, fmt_stats

SAMPLE_LINES = 40
TOP_TOKENS = 20


def _refuse(run_dir: Path, why: str) -> PfreezeError:
    return PfreezeError(f"no pfreeze run in {run_dir} ({why})",
                        "pass the output_dir of a finished or running `pfreeze run`")


def metric_rows(metrics_path: Path) -> list[Row]:
    """A run's metrics.jsonl rows (train and eval of every arm), in step order."""
    rows = [r for r in read_jsonl(metrics_path)
            if isinstance(r, dict) and "arm" in r and isinstance(r.get("step"), int)]
    rows.sort(key=lambda r: r["step"])  # arms are interleaved; plots want step order
    return rows


def _load(run_dir: Path) -> tuple[Summary, list[Row], bool]:
    """The run's summary and metrics rows, and whether summary.json was there.

    A killed run has no summary.json (or one without arms): its summary is rebuilt from
    config.yaml and metrics.jsonl, which every run writes from the start.
    """
    summary_path, metrics_path = run_dir / "summary.json", run_dir / "metrics.jsonl"
    config_path = run_dir / "config.yaml"
    if not summary_path.is_file() and not config_path.is_file():
        raise _refuse(run_dir, "summary.json missing")
    if not metrics_path.is_file():
        raise _refuse(run_dir, "metrics.jsonl missing")
    summary: Summary = {}
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise PfreezeError(f"{summary_path} is not valid JSON ({exc})",
                               "re-run `pfreeze run` for this directory") from exc
    rows = metric_rows(metrics_path)
    if summary.get("arms"):
        return summary, rows, True
    if not config_path.is_file():
        raise _refuse(run_dir, "summary.json lists no arms and config.yaml is missing")
    return killed_summary(summary, read_config(config_path), rows), rows, summary_path.is_file()


def _arm_names(summary: Summary, rows: list[Row]) -> list[str]:
    # summary order first: the first arm is the reference that others are compared to
    ordered = [str(a) for a in summary.get("arms") or {}] + [str(r["arm"]) for r in rows]
    return list(dict.fromkeys(ordered))


def _f(x: Any, digits: int = 3) -> str:
    v = num(x)
    return f"{v:.{digits}f}" if math.isfinite(v) else DASH


def _int(x: Any) -> str:
    return f"{round(num(x)):,}" if math.isfinite(num(x)) else DASH


def _seconds(x: Any, digits: int) -> str:
    return f"{_f(x, digits)} s" if math.isfinite(num(x)) else DASH


def _p(p: Any) -> str:
    """p in %, ± half its 95% CI (as the evidence report, compare and the CLI show it)."""
    return fmt_stats(p, "%")


def _probe(a: dict[str, Any]) -> str:
    """Probe loss before → after, and its rise (the forgetting); summary.json has the value
    at the best step too."""
    keys = ("probe_loss_before", "probe_loss_after")
    if all(a.get(k) is None for k in keys):
        return DASH
    rise = num(a.get("forgetting_after"))
    return " → ".join(_f(a.get(k)) for k in keys) + (
        f" ({rise:+.3f})" if math.isfinite(rise) else "")


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
    gap = num(a.get("val_loss_after")) - num(a.get("train_loss_after"))
    ratio = num(a.get("median_step_time_s")) / ref_median if ref_median else math.nan
    pct = 100 * num(a.get("trainable_params")) / (num(a.get("total_params") or total) or math.nan)
    best = f"{_f(a.get('val_loss_best'))} (step {_int(a.get('val_loss_best_step'))})"
    return {
        "arm": arm,
        "trainable": _int(a.get("trainable_params"))
        + (f" ({pct:.3g}%)" if pct < 1 else f" ({pct:.1f}%)" if math.isfinite(pct) else ""),
        "steps": _int(a.get("steps")), "time": _seconds(a.get("total_time_s"), 1),
        "median": fmt(a.get("median_step_time_s"), "ms"),
        "ratio": f"{ratio:.2f}×" if math.isfinite(ratio) else DASH,
        "tps": _int(a.get("tokens_per_s")), "gap": _f(gap),
        "mean_loss": _f(a.get("mean_loss")), "last_loss": _f(a.get("last_loss")),
        "val": f"{_f(a.get('val_loss_before'))} → {best} → {_f(a.get('val_loss_after'))}",
        "probe": _probe(a),
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
        # a killed run knows neither count: None == None is no evidence of a full arm
        full = a.get("kind") == "full" or (a.get("trainable_params") is not None
                                           and a.get("trainable_params") == a.get("total_params"))
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
    done = max((num(a.get("steps")) for a in info.values() if a.get("steps")), default=None)
    planned = _find(config, "max_steps", "steps")
    batch = _find(config, "per_device_train_batch_size", "batch_size") or DASH
    accum = num(_find(config, "gradient_accumulation_steps"))
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
    n_total = num(corpus.get("n_total")) or math.nan  # no share column from a zero total
    top = [{"rank": i + 1, "id": t.get("id", DASH), "token": _token(t.get("token")),
            "count": _int(t.get("count")), "share": _f(100 * num(t.get("count")) / n_total, 2)}
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
        "arms": [_arm_row(a, info[a], total, num(info[arms[0]].get("median_step_time_s")))
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


_BACKTICKED = re.compile(r"`([^`\n]+)`")


def _html_code(text: Any) -> Markup:
    """Markdown's `code` spans as <code> in HTML: the text is escaped first, never trusted."""
    return Markup(_BACKTICKED.sub(r"<code>\1</code>", str(escape(text))))


_STEP_BREAKS = re.compile(r"( → | (?=\())")  # before an arrow's "→", or a "(step 4)"


def _html_steps(text: Any) -> Markup:
    """An "a → b (step k) → c" cell wraps only between values, each kept on one line."""
    parts = _STEP_BREAKS.split(str(text))  # values at even indices, the breaks between them
    return Markup("".join(str(escape(part)) if i % 2 else f'<span class="nw">{escape(part)}</span>'
                          for i, part in enumerate(parts)))


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(  # StrictUndefined: a template typo fails loudly, not blank
        loader=jinja2.PackageLoader("pfreeze.outputs", "templates"),
        undefined=jinja2.StrictUndefined,
        autoescape=lambda name: bool(name and name.endswith(".html.j2")),
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    # a "|" inside a cell would split a Markdown table row
    env.filters["md"] = lambda v: str(v).replace("|", "\\|").replace("\n", " ")
    env.filters["code"] = _html_code
    env.filters["steps"] = _html_steps
    return env


def render_report(run_dir: Path) -> dict[str, Path]:
    """Write the plots, report.md and report.html into `run_dir`.

    Returns {kind: path}: one key per plot ("loss", "loss_scatter", "step_time", "dw", "dw0",
    "p"; loss_scatter only with two or more arms), then "md" and "html". A run that was
    interrupted or killed is rendered from what it wrote, marked as partial. Raises
    PfreezeError when `run_dir` holds neither summary.json nor config.yaml, or no
    metrics.jsonl.
    """
    run_dir = Path(run_dir)
    summary, rows, had_summary = _load(run_dir)
    arms = _arm_names(summary, rows)
    ctx = _context(run_dir, summary, arms)
    planned = _int(_find(summary.get("config") or {}, "max_steps", "steps"))
    ctx["partial"] = partial_note(summary, rows, planned, had_summary)
    written: dict[str, Path] = {}
    ctx["figures"] = []
    for name, path, caption in draw(rows, summary, arms, run_dir):
        written[name] = path
        uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        ctx["figures"].append({"file": path.name, "caption": caption, "uri": uri})
    env = _templates()
    for ext in ("md", "html"):
        text = env.get_template(f"report.{ext}.j2").render(**ctx)
        written[ext] = write_text(run_dir / f"report.{ext}", text)
    return written
