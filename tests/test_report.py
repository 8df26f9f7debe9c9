"""render_report on synthetic run directories: files exist, content is right, errors are clear."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from pfreeze.errors import PfreezeError
from pfreeze.outputs.report import render_report

PNGS = ["loss", "loss_scatter", "step_time", "dw", "dw0", "p"]
TOTAL = 134_515_008


def _p(mean: float) -> dict[str, Any]:
    return {"mean": mean, "std": 0.05, "ci95": [mean - 0.05, mean + 0.05], "n": 8,
            "values": [mean] * 8}


def _arm(name: str, i: int, trainable: int, ok: bool | None = True) -> dict[str, Any]:
    integrity = None if ok is None else {
        "ok": ok, "checked_elements": 120_000_000, "frozen_tensors": 250,
        "violations": [] if ok else ["model.layers.3.self_attn.q_proj.weight"]}
    return {
        "kind": "full" if i == 0 else "plan", "description": f"arm {name}",
        "trainable_params": trainable, "total_params": TOTAL, "theta0_hash": "abc123",
        "steps": 5, "total_time_s": 2.5 + i, "median_step_time_s": 0.5 + 0.1 * i,
        "tokens_per_s": 2000.0, "mean_loss": 3.1, "last_loss": 2.9, "val_loss_before": 3.4,
        "val_loss_best": 3.2, "val_loss_best_step": 4 - i, "val_loss_after": 3.25,
        "train_loss_after": 2.8, "peak_mem_mb": None, "p_before": _p(0.5),
        "p_after": _p(0.52 + 0.01 * i), "integrity": integrity,
    }


def _make_run(root: Path, arms: dict[str, int], *, bad_integrity: bool = False,
              untracked: str | None = None) -> Path:
    rows: list[dict[str, Any]] = []
    for step in range(6):
        for i, name in enumerate(arms):
            if step in (0, 5):
                rows.append({"kind": "eval", "step": step, "arm": name,
                             "val_loss": 3.4 - 0.02 * step * (i + 1), "train_loss": None})
            if step == 0:
                continue
            dw = {f"L{layer}.{role}": (0.0 if i and layer == 0 else 0.01 * (layer + 1))
                  for layer in range(3) for role in "qkvo" if name != untracked}
            rows.append({"kind": "train", "step": step, "arm": name, "loss": 3.3 - 0.05 * step * i,
                         "lr": 1e-4, "step_time_s": 0.5 + 0.01 * step, "tokens_per_s": 2000.0,
                         "batch_hash": f"h{step}", "mem_mb": None, "dw": dw,
                         "dw0": {k: v * step for k, v in dw.items()}})
    root.mkdir(parents=True, exist_ok=True)
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "pfreeze_version": "0.1.0", "created": "2026-11-29T12:00:00Z",
        "command": "pfreeze run --config c.yaml", "status": "finished", "theta0_hash": "abc123",
        "environment": {"python": "3.11.7", "torch": "2.13.0", "device": "cpu", "git_hash": None},
        "model": {"name": "smollm2-135m", "architecture": "llama", "n_layers": 3,
                  "total_params": TOTAL, "tied_embeddings": True},
        "config": {"training": {"max_steps": 5, "per_device_train_batch_size": 4,
                                "gradient_accumulation_steps": 2, "learning_rate": 1e-4},
                   "data": {"block_size": 64}},
        "corpus": {"source": "pg2701.txt", "n_total": 325000, "n_unique": 17000,
                   "n_train": 292000, "n_val": 32500, "p_train": 0.55, "p_val": 0.54,
                   "top": [{"id": k, "token": f" tok{k}", "count": 14000 - k} for k in range(100)]},
        "arms": {n: _arm(n, i, t, ok=not (bad_integrity and i == 1))
                 for i, (n, t) in enumerate(arms.items())},
    }
    (root / "summary.json").write_text(json.dumps(summary))
    # Two samples per (arm, moment); the excerpt shows the first of each.
    (root / "samples.txt").write_text("".join(
        f"=== arm={a} moment={m} prompt='P' seed=1 sample={i} p=0.5\nsample {a} {m} {i}\n\n"
        for a in ("full", "plan") for m in ("before", "after") for i in range(2)))
    return root


def _check_outputs(run: Path, out: dict[str, Path], pngs: list[str]) -> tuple[str, str]:
    for name in pngs:
        assert out[name] == run / f"{name}.png"
        assert out[name].read_bytes().startswith(b"\x89PNG"), name
    assert out["md"] == run / "report.md" and out["html"] == run / "report.html"
    md, html = out["md"].read_text(), out["html"].read_text()
    assert html.count("data:image/png;base64,") == len(pngs)
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", html)
    assert not list(run.glob(".*.tmp"))  # atomic writes left no temporaries behind
    return md, html


def test_two_arms(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "run", {"full": TOTAL, "plan": 1_769_472})
    out = render_report(run)
    md, html = _check_outputs(run, out, PNGS)
    for text in (md, html):
        assert "full" in text and "plan" in text
        assert "134,515,008" in text and "1,769,472 (1.3%)" in text
        assert "(step 4)" in text and "(step 3)" in text
        assert "all arms started from the same θ₀" in text
        assert "VIOLATION" not in text
        for a in ("full", "plan"):
            for m in ("before", "after"):
                assert f"sample {a} {m} 0" in text and f"sample {a} {m} 1" not in text
    assert "120,000,000 checked" in md
    assert "1.20×" in md  # plan's median step time relative to full
    assert "![" in md and "(loss.png)" in md
    assert "`pfreeze run --config c.yaml`" in md
    assert "batch size: 4 × 2 accumulation steps; window: 64 tokens; learning rate: 0.0001" in md


def test_three_arms_odd_names(tmp_path: Path) -> None:
    # a LoRA arm tracks no matrices: its dw/dw0 dicts are empty
    arms = {"full": TOTAL, "plan <b>|x": 42_000, "lora-r8": 300_000}
    run = _make_run(tmp_path / "run", arms, untracked="lora-r8")
    md, html = _check_outputs(run, render_report(run), PNGS)
    assert "plan <b>\\|x" in md and "plan &lt;b&gt;|x" in html and "<b>|x" not in html
    assert "42,000" in md and "300,000" in md


def test_single_arm_skips_scatter(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "run", {"only": TOTAL})
    out = render_report(run)
    assert "loss_scatter" not in out and not (run / "loss_scatter.png").exists()
    _check_outputs(run, out, [p for p in PNGS if p != "loss_scatter"])


def test_missing_fields_and_truncated_line(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "run", {"full": TOTAL, "plan": 1000})
    summary = json.loads((run / "summary.json").read_text())
    for key in ("total_time_s", "val_loss_best", "val_loss_best_step", "train_loss_after",
                "p_after", "theta0_hash", "integrity"):
        summary["arms"]["plan"][key] = None
    summary["arms"]["full"].pop("p_before")
    summary["corpus"]["p_train"] = None
    summary["environment"] = None
    summary["config"] = {}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "samples.txt").unlink()
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 6, "arm": "plan", "lo')  # killed mid-write
    md, html = _check_outputs(run, render_report(run), PNGS)
    assert "—" in md and "—" in html
    assert "WARNING" in md  # plan has no θ₀ hash, so pairing cannot be confirmed
    assert "Samples" not in md


def test_integrity_violation_and_theta0_mismatch_are_loud(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "run", {"full": TOTAL, "plan": 1000}, bad_integrity=True)
    summary = json.loads((run / "summary.json").read_text())
    summary["arms"]["plan"]["theta0_hash"] = "def456"
    (run / "summary.json").write_text(json.dumps(summary))
    md, html = _check_outputs(run, render_report(run), PNGS)
    assert "VIOLATION" in md and "q_proj" in md
    assert "VIOLATION" in html and 'class="bad"' in html
    assert "WARNING: arms started from different θ₀" in md


@pytest.mark.parametrize("missing", ["summary.json", "metrics.jsonl"])
def test_missing_files_raise(tmp_path: Path, missing: str) -> None:
    run = _make_run(tmp_path / "run", {"full": TOTAL, "plan": 1000})
    (run / missing).unlink()
    with pytest.raises(PfreezeError, match="no pfreeze run in") as exc:
        render_report(run)
    assert exc.value.fix == "pass the output_dir of a finished or running `pfreeze run`"
    if missing == "summary.json":
        assert exc.value.problem == f"no pfreeze run in {run} (summary.json missing)"


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(PfreezeError, match=r"summary\.json missing"):
        render_report(tmp_path / "nope")


def test_p_at_the_best_point_is_shown_when_measured(tmp_path: Path) -> None:
    root = _make_run(tmp_path / "run", {"full": TOTAL, "plan": 1_769_472})
    summary = json.loads((root / "summary.json").read_text())
    summary["arms"]["plan"]["p_best"] = {"mean": 0.4321, "std": 0.01, "ci95": [0.42, 0.44],
                                         "n": 8}
    (root / "summary.json").write_text(json.dumps(summary))
    render_report(root)
    md = (root / "report.md").read_text()
    assert "(best point: 43.2 ± 1.0%)" in md
    assert md.count("best point:") == 1  # only the arm that has it


def test_backticks_become_code_in_html_only(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "run", {"full": TOTAL, "plan": 1000})
    summary = json.loads((run / "summary.json").read_text())
    summary["arms"]["plan"]["description"] = \
        "precision-frozen: only `layers=50%: roles=q,k,v` trains, `<b>x</b>` too"
    (run / "summary.json").write_text(json.dumps(summary))
    md, html = _check_outputs(run, render_report(run), PNGS)
    assert "only `layers=50%: roles=q,k,v` trains, `<b>x</b>` too" in md
    # escaped first, then converted: the text itself never becomes markup
    assert ("only <code>layers=50%: roles=q,k,v</code> trains, "
            "<code>&lt;b&gt;x&lt;/b&gt;</code> too") in html
    assert "`" not in html.split("<h2>What was run</h2>")[1].split("</p>")[0]


HEADLINE = ["Arm", "Trainable params", "p before → after",
            "Val loss before → best (step) → after", "Median step"]


def test_tables_scroll_inside_wrappers_key_columns_first(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "run", {"full": TOTAL, "plan": 1000})
    md, html = _check_outputs(run, render_report(run), PNGS)
    body = html.split("<body>")[1]
    # every table sits in its own horizontal scroll box, so none can widen the page
    assert body.count("<table>") == body.count('<div class="scroll">\n<table>') > 0
    assert re.search(r"\.scroll\s*{[^}]*overflow-x:\s*auto", html)
    assert re.search(r"[^}]*\bcode\b[^{]*{[^}]*overflow-wrap:\s*anywhere", html)
    headline = body.split("<h2>Headline</h2>")[1].split("</tr>")[0]
    assert re.findall(r"<th>([^<]*)</th>", headline)[:5] == HEADLINE
    md_head = md.split("## Headline")[1].strip().splitlines()[0]
    assert [c.strip() for c in md_head.strip("|").split("|")][:5] == HEADLINE
    # the p cell (key result) wraps only between its values
    assert '<span class="nw">50.0 ± 5.0%</span> → <span class="nw">53.0 ± 5.0%</span>' in html


def test_an_interrupted_run_is_rendered_as_partial(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "run", {"full": TOTAL, "plan": 1000})
    summary = json.loads((run / "summary.json").read_text())
    summary.update(status="interrupted", interrupted_at_step=3)
    for arm in summary["arms"].values():  # the end-of-run fields: null or missing
        arm.update(p_after=None, val_loss_after=None, integrity=None)
        for key in ("train_loss_after", "p_best"):
            arm.pop(key, None)
    (run / "summary.json").write_text(json.dumps(summary))
    md, html = _check_outputs(run, render_report(run), PNGS)
    for text in (md, html):
        assert "Partial: interrupted at step 3 of 5." in text
        assert "50.0 ± 5.0% → —" in text.replace('<span class="nw">', "").replace(
            "</span>", "")
    assert md.index("Partial:") < md.index("## What was run")
    assert 'class="partial"' in html


def _write_config(run: Path, arms: list[dict[str, Any]], max_steps: int) -> None:
    (run / "config.yaml").write_text(yaml.safe_dump({
        "model": {"name": "random:gpt2"}, "data": {"corpus": "small.txt", "block_size": 32},
        "training": {"max_steps": max_steps, "learning_rate": 1e-3}, "arms": arms}))


def test_a_killed_run_is_rendered_from_config_and_metrics(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "run", {"full": TOTAL, "plan": 1000})
    (run / "summary.json").unlink()
    _write_config(run, [{"name": "full", "kind": "full"}, {"name": "plan", "kind": "plan",
                                                         "select": "layers=50%"}], 10)
    md, html = _check_outputs(run, render_report(run), PNGS)
    for text in (md, html):
        assert "Partial: the run was killed at step 5 of 10 (no summary.json)." in text
        assert "status <strong>killed</strong>" in text or "status **killed**" in text
        assert "random:gpt2" in text and "Steps: 5 of 10 planned" in text
        # held-out loss before → best (step) → latest, from the eval rows of each arm
        assert "3.400 → 3.300 (step 5) → 3.300" in re.sub(r"</?span[^>]*>", "", text)
        assert "3.400 → 3.200 (step 5) → 3.200" in re.sub(r"</?span[^>]*>", "", text)
    assert "| **plan** |" in md
    # what a killed run never measured is a dash, not a guess
    assert "- **plan**: not checked" in md and "— s" not in md


def test_a_killed_tiny_run_renders(tiny_run: Any, tmp_path: Path) -> None:
    # the real files of a run, with summary.json gone and metrics cut after step 3
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "samples.txt"):
        shutil.copy(tiny_run.dir / name, run / name)
    kept = [r for r in tiny_run.rows if r["step"] <= 3]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    out = render_report(run)
    md = out["md"].read_text()
    last = max(r["step"] for r in kept if r["kind"] == "train")
    assert f"Partial: the run was killed at step {last} of 5 (no summary.json)." in md
    for arm in tiny_run.summary["arms"]:
        assert f"| **{arm}** |" in md


def test_a_summary_without_arms_needs_config_yaml(tmp_path: Path) -> None:
    # summary.json of a run killed before it listed arms, and no config.yaml to name them
    run = _make_run(tmp_path / "run", {"full": TOTAL})
    summary = json.loads((run / "summary.json").read_text())
    summary["arms"] = {}
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(PfreezeError) as exc:
        render_report(run)
    assert exc.value.problem == (f"no pfreeze run in {run} "
                                 "(summary.json lists no arms and config.yaml is missing)")
    _write_config(run, [{"name": "full", "kind": "full"}], 5)
    assert "killed at step 5 of 5 (summary.json lists no arms)" in \
        render_report(run)["md"].read_text()
