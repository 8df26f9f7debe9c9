"""The evidence report of repeats: claims whose verdicts follow from the CIs, human-formatted
numbers, the combined report for 2 and 3 repeats and for an interrupted-then-resumed run,
`pfreeze report` of a repeats folder and `pfreeze compare`."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from pfreeze.cli import app
from pfreeze.config import load_config
from pfreeze.errors import PfreezeError
from pfreeze.measure.stats import mean_ci
from pfreeze.outputs.claims import CONTRADICTED, HOLDS, NOT_SHOWN, claims_table, verdict
from pfreeze.outputs.compare import compare
from pfreeze.outputs.evidence import render_evidence, render_repeats
from pfreeze.outputs.repeats import aggregate, render_markdown
from pfreeze.outputs.report import render_report
from pfreeze.run.interrupts import Interrupted
from pfreeze.run.session import run

EXPONENT = re.compile(r"\d[eE][+-]?\d")


def _arm(trainable: int, step_s: float, mem: float | None, val_after: float,
         train_after: float, p: tuple[float, float, float], forgetting: float,
         best: float) -> dict[str, Any]:
    p_before, p_after, p_std = p
    return {"trainable_params": trainable, "median_step_time_s": step_s,
            "tokens_per_s": 4096 / step_s, "peak_mem_mb": mem, "last_loss": train_after,
            "mean_loss": train_after + 0.5, "val_loss_best": best, "val_loss_best_step": 50,
            "val_loss_after": val_after, "train_loss_after": train_after,
            "p_before": {"mean": p_before, "std": 0.2}, "p_after": {"mean": p_after, "std": p_std},
            "probe_loss_before": 3.0, "probe_loss_after": 3.0 + forgetting,
            "learning_best": 4.0 - best, "learning_after": 4.0 - val_after,
            "forgetting_best": forgetting / 2, "forgetting_after": forgetting}


# Three known repeats: (full, frozen) per repeat. By construction, frozen − full is
#   trainable        −90 every repeat (no spread)                     -> fewer: holds
#   step time        −10, −9, −11 ms                                  -> faster: holds
#   peak memory      not measured (CPU)                               -> not shown
#   overfit gap      +0.2, −0.3, +0.15                                -> not shown (CI has 0)
#   p                rises 0.30 -> ~0.50; spread 0.05 vs full's 0.11  -> holds
#   forgetting       +0.5, +0.6, +0.4 (frozen forgets more)           -> contradicted
#   best held-out    +0.05, +0.06, +0.04 (frozen's best is worse)     -> contradicted
KNOWN = [
    ({"full": _arm(100, 0.020, None, 5.0, 4.0, (0.30, 0.60, 0.10), 0.1, 3.80),
      "frozen": _arm(10, 0.010, None, 5.2, 4.0, (0.30, 0.50, 0.05), 0.6, 3.85)}),
    ({"full": _arm(100, 0.021, None, 5.1, 4.0, (0.30, 0.62, 0.12), 0.2, 3.81),
      "frozen": _arm(10, 0.012, None, 4.8, 4.0, (0.30, 0.52, 0.06), 0.8, 3.87)}),
    ({"full": _arm(100, 0.019, None, 4.9, 4.0, (0.30, 0.58, 0.11), 0.0, 3.79),
      "frozen": _arm(10, 0.008, None, 5.05, 4.0, (0.30, 0.48, 0.04), 0.4, 3.83)}),
]
EXPECTED = {"fewer trainable parameters": HOLDS, "faster steps": HOLDS,
            "less memory": NOT_SHOWN, "less overfitting": NOT_SHOWN,
            "p rises with less spread": HOLDS, "knowledge preserved": CONTRADICTED,
            "same or better optimum": CONTRADICTED}


def test_claims_verdicts_follow_from_the_cis() -> None:
    agg = aggregate([{"arms": arms} for arms in KNOWN])
    table = {row["claim"]: row for row in claims_table(agg)}
    assert {c: r["verdict"] for c, r in table.items()} == EXPECTED
    # The intervals the verdicts came from, by hand.
    step = mean_ci([-0.010, -0.009, -0.011])
    assert agg["arms"]["frozen"]["vs_reference"]["median_step_time_s"]["ci95"] == \
        pytest.approx(step["ci95"])
    assert step["ci95"][1] < 0
    gap = mean_ci([0.2, -0.3, 0.15])
    assert gap["ci95"][0] < 0 < gap["ci95"][1]
    assert "−" not in table["faster steps"]["figure"] and "ms" in table["faster steps"]["figure"]
    assert "GPU only" in table["less memory"]["figure"]
    assert table["faster steps"]["figure"].startswith("median step: -10.0 ± 2.5 ms (-50%)")


def test_claims_flip_when_the_figures_do() -> None:
    flipped = [{"arms": {"full": a["frozen"], "frozen": a["full"]}} for a in KNOWN]
    table = {r["claim"]: r["verdict"] for r in claims_table(aggregate(flipped))}
    assert table["fewer trainable parameters"] == CONTRADICTED
    assert table["faster steps"] == CONTRADICTED
    assert table["knowledge preserved"] == HOLDS
    assert table["same or better optimum"] == HOLDS
    assert table["p rises with less spread"] == CONTRADICTED  # more spread than the reference


@pytest.mark.parametrize(("ci", "lower", "expected"), [
    ([-2.0, -1.0], True, HOLDS), ([1.0, 2.0], True, CONTRADICTED), ([-1.0, 1.0], True, NOT_SHOWN),
    ([0.0, 0.0], True, CONTRADICTED), ([1.0, 2.0], False, HOLDS), ([None, None], True, NOT_SHOWN),
])
def test_verdict_of_an_interval(ci: list, lower: bool, expected: str) -> None:
    assert verdict({"mean": 0.0, "ci95": ci}, lower) == expected


def test_one_repeat_shows_nothing() -> None:
    table = claims_table(aggregate([{"arms": KNOWN[0]}]))
    assert {r["verdict"] for r in table} == {NOT_SHOWN}
    assert "one repeat" in table[1]["why"]


def test_repeats_md_numbers_are_human_formatted() -> None:
    text = render_markdown(aggregate([{"arms": arms} for arms in KNOWN]))
    assert not EXPONENT.search(text), text
    assert " ms" in text and " k tok/s" in text and "%" in text and " pp" in text
    assert "20.0 ± 2.5 ms" in text  # full's median step: mean 0.020 s, CI half 0.00248 s



def _cells(line: str) -> list[str]:
    """The cells of a Markdown table row ('\\|' inside a cell is no border)."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]


def _table(md: str, heading: str) -> list[list[str]]:
    """The rows (header first, the --- line left out) of the first table under `heading`."""
    lines = md.split(heading, 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    rows = [_cells(ln) for ln in itertools.takewhile(lambda ln: ln.startswith("|"),
                                                     lines[start:])]
    return [rows[0], *rows[2:]]


def test_a_pipe_in_an_arm_name_does_not_break_repeats_md() -> None:
    renamed = [{"arms": {"full": a["full"], "a|b": a["frozen"]}} for a in KNOWN]
    text = render_markdown(aggregate(renamed))
    rows = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert rows and {len(_cells(r)) for r in rows} == {len(_cells(rows[0]))}
    assert "| a\\|b |" in text


# ------------------------------------------------------------------ real tiny repeats runs


@pytest.fixture(scope="module")
def three(make_config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evidence") / "three"
    run(make_config("repeats=3", "training.max_steps=4"), out)
    return out


def test_combined_report_of_three_repeats(three: Path) -> None:
    written = render_repeats(three)
    for r in range(3):
        assert (three / f"repeat-{r}" / "report.html").is_file()
    for name in ("evidence.html", "evidence.md", "evidence-curves.png", "evidence-scatter.png"):
        assert (three / name).stat().st_size > 0
    md = (three / "evidence.md").read_text()
    assert "3 of 3 repeats finished" in md and "Partial" not in md
    assert len(re.findall(r"\| \*\*(holds|contradicted|not shown)\*\* \(", md)) == 7
    assert not EXPONENT.search(md.split("## Figures")[0])
    assert written["html"] == three / "evidence.html"


def test_combined_report_of_two_repeats(three: Path, tmp_path: Path) -> None:
    two = tmp_path / "two"
    two.mkdir()
    for r in range(2):
        shutil.copytree(three / f"repeat-{r}", two / f"repeat-{r}")
        # As a GPU run records it: the header names the card, not just "cuda".
        summary = json.loads((two / f"repeat-{r}" / "summary.json").read_text())
        summary["environment"].update(device="cuda", device_name="NVIDIA H100 80GB HBM3")
        (two / f"repeat-{r}" / "summary.json").write_text(json.dumps(summary))
    cfg = yaml.safe_load((three / "config.yaml").read_text())
    (two / "config.yaml").write_text(yaml.safe_dump({**cfg, "repeats": 2}))
    render_evidence(two)
    md = (two / "evidence.md").read_text()
    assert "2 of 2 repeats finished" in md
    assert "· device NVIDIA H100 80GB HBM3\n" in md
    agg = (two / "repeats.json").read_text()
    assert '"repeats": 2' in agg


def test_interrupted_then_resumed_repeats(make_config, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = make_config("repeats=2", "training.max_steps=4", "training.save_steps=2")
    calls = []

    def on_step(step: int, _: dict) -> None:
        calls.append(step)
        if len(calls) == 6:  # repeat 1, step 2: as if Ctrl-C were pressed
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        run(cfg, out, on_step=on_step)
    # the interrupted repeat gets its partial report; the evidence covers the finished one
    assert "Partial: interrupted" in render_report(out / "repeat-1")["md"].read_text()
    render_evidence(out)
    assert "1 of 2 repeats finished" in (out / "evidence.md").read_text()
    run(load_config(out / "config.yaml"), out, resume=True)
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    md = (out / "evidence.md").read_text()
    assert "2 of 2 repeats finished" in md and "Partial" not in md


def test_evidence_of_a_folder_without_repeats(tmp_path: Path) -> None:
    with pytest.raises(PfreezeError, match="no repeats in"):
        render_evidence(tmp_path)


def test_compare_puts_two_runs_side_by_side(three: Path, tiny_run) -> None:
    header, rows, notes = compare([tiny_run.dir, three])
    assert header == ["figure", "run: full", "run: plan", "three: full", "three: plan"]
    by = {r[0]: r[1:] for r in rows}
    full = tiny_run.summary["arms"]["full"]
    assert by["trainable params"][0] == f"{full['trainable_params']:,}"
    assert by["held-out after"][0] == f"{full['val_loss_after']:.3f}"
    assert "±" in by["held-out after"][2]  # a repeats run: mean ± CI
    assert "3 repeats" in notes[1]
    result = CliRunner().invoke(app, ["compare", "--markdown", str(tiny_run.dir), str(three)])
    assert result.exit_code == 0 and "| trainable params |" in result.output



def test_repeats_md_evidence_and_compare_show_the_same_cells(three: Path) -> None:
    render_evidence(three)
    repeats = _table((three / "repeats.md").read_text(), "seeds")  # arms as rows
    by_arm = {r[0]: dict(zip(repeats[0][1:], r[1:], strict=True)) for r in repeats[1:]}
    evidence = _table((three / "evidence.md").read_text(), "## Per arm")  # arms as columns
    header, rows, _ = compare([three, three])
    arms = evidence[0][1:]
    assert arms == list(by_arm) == [h.split(": ", 1)[1] for h in header[1:3]]
    shown = 0
    for ev, cmp in zip(evidence[1:], rows, strict=True):
        assert ev == cmp[:3] and cmp[1:3] == cmp[3:]  # the same cells, folder after folder
        for arm, cell in zip(arms, ev[1:], strict=True):
            if ev[0] in by_arm[arm]:
                assert by_arm[arm][ev[0]] == cell, (arm, ev[0])
                shown += 1
    assert shown == 2 * (len(repeats[0]) - 1) and "±" in by_arm["plan"]["held-out after"]


def test_compare_refuses_a_folder_without_a_run(three: Path, tmp_path: Path) -> None:
    with pytest.raises(PfreezeError, match="no pfreeze run in"):
        compare([three, tmp_path])


def test_cli_run_with_repeats_renders_every_report(tiny_overrides, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    sets = [x for item in tiny_overrides("repeats=2", "training.max_steps=2")
            for x in ("--set", item)]
    result = CliRunner().invoke(app, ["run", "-o", str(out), *sets])
    assert result.exit_code == 0, result.output
    assert (out / "repeat-0" / "report.html").is_file()
    assert (out / "repeat-1" / "report.html").is_file()
    assert (out / "evidence.html").is_file() and "evidence:" in result.output


def test_seed_protocol_config_is_the_notebooks() -> None:
    cfg = load_config(Path(__file__).parents[1] / "configs" / "seed-protocol.yaml")
    t, g = cfg.training, cfg.generation
    assert (t.learning_rate, t.max_steps, t.per_device_train_batch_size) == (5e-4, 474, 16)
    assert cfg.data.block_size == 256 and cfg.repeats == 3 and t.keep_best
    assert len(g.prompts) * g.samples_per_prompt == 10 and g.max_new_tokens == 100
    assert cfg.data.probe_corpus != "none"
    assert [a.name for a in cfg.arms] == ["full", "qkv-upper"]


def test_evidence_before_any_repeat_finished_says_how_to_finish(tmp_path: Path) -> None:
    (tmp_path / "repeat-0").mkdir()
    (tmp_path / "repeat-0" / "config.yaml").write_text("repeats: 1\n")
    (tmp_path / "config.yaml").write_text("repeats: 2\n")
    with pytest.raises(PfreezeError, match="no repeat in .* has finished yet"):
        render_evidence(tmp_path)


def test_compare_needs_two_folders(tiny_run) -> None:
    result = CliRunner().invoke(app, ["compare", str(tiny_run.dir)])
    assert isinstance(result.exception, PfreezeError)
    assert "compare needs two or more run directories" in str(result.exception)


def test_evidence_of_one_arm_without_the_probe(make_config, tmp_path: Path) -> None:
    out = tmp_path / "one"
    run(make_config("repeats=2", "training.max_steps=2", "arms=[{kind: full}]",
                    "data.probe_corpus=none"), out)
    md = render_evidence(out)["md"].read_text()
    assert "One arm only" in md and "forgetting probe: off" in md
    assert "| forgetting | — |" in md
