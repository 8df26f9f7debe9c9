"""The forgetting probe: its loss equals a hand computation, before and after training, on
windows fixed across arms; learning and forgetting are the differences the summary says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyRun, rows_of

from pfreeze.errors import PfreezeError
from pfreeze.measure.heldout import fixed_windows
from pfreeze.measure.probe import build_probe, read_probe_text
from pfreeze.models.load import load_model


def hand_loss(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """Mean over windows of the mean next-token cross-entropy, written out."""
    model.eval()
    per_window = []
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0].double()
            logp = F.log_softmax(logits[:-1], dim=-1)
            nll = -logp[torch.arange(len(w) - 1), w[1:]]
            per_window.append(float(nll.mean()))
    return sum(per_window) / len(per_window)


def test_builtin_probe_is_installed_public_domain_text() -> None:
    text, source = read_probe_text("builtin:us-documents")
    assert "We hold these truths to be self-evident" in text and len(text) > 15_000
    assert "public domain" in source
    readme = Path(__file__).parents[1] / "src/pfreeze/measure/texts/README.md"
    assert "public domain" in readme.read_text()


def test_probe_windows_are_fixed_windows_of_the_probe_text() -> None:
    lm = load_model("random:llama")
    probe = build_probe("builtin:us-documents", lm.tokenizer, 32, 5)
    ids = lm.tokenizer.encode(read_probe_text("builtin:us-documents")[0])
    assert torch.equal(probe.windows, fixed_windows(ids, 32, 5))
    assert probe.info() == {"source": probe.source, "windows": 5, "window_tokens": 32,
                            "text_tokens": len(ids)}


def test_probe_loss_equals_hand_computation(tiny_run: TinyRun) -> None:
    windows = tiny_run.loop.moments.probe_windows
    assert windows is not None and len(windows) == 4  # eval_batches 2 x batch 2
    theta0 = load_model("random:gpt2", seed=tiny_run.cfg.training.seed).model
    before = hand_loss(theta0, windows)
    evals = rows_of(tiny_run.rows, "eval")
    for arm in tiny_run.loop.arms:
        name = arm.strategy.name
        mine = [r for r in evals if r["arm"] == name]
        s = tiny_run.summary["arms"][name]
        # the same windows for every arm: before training, every arm's probe loss is θ₀'s
        assert mine[0]["step"] == 0 and mine[0]["probe_loss"] == pytest.approx(before, rel=1e-6)
        after = hand_loss(arm.model, windows)
        assert s["probe_loss_after"] == pytest.approx(after, rel=1e-6)
        assert mine[-1]["probe_loss"] == s["probe_loss_after"]
        # float32 losses: the difference is exact of the reported figures, close to the hand one
        assert s["forgetting_after"] == s["probe_loss_after"] - s["probe_loss_before"]
        assert s["forgetting_after"] == pytest.approx(after - before, abs=1e-5)
        assert s["learning_after"] == pytest.approx(s["val_loss_before"] - s["val_loss_after"])
        best = next(r for r in mine if r["step"] == s["val_loss_best_step"])
        assert s["probe_loss_best"] == best["probe_loss"]
        assert s["forgetting_best"] == pytest.approx(best["probe_loss"] - before, abs=1e-5)
    assert tiny_run.summary["probe"]["windows"] == 4


def test_probe_none_turns_it_off(make_config, tmp_path: Path) -> None:
    from pfreeze.run.session import run

    cfg = make_config("training.max_steps=2", "data.probe_corpus=none")
    summary = run(cfg, tmp_path / "run")
    assert summary["probe"] is None
    rows = rows_of([__import__("json").loads(x) for x in
                    (tmp_path / "run/metrics.jsonl").read_text().splitlines()], "eval")
    assert rows and all("probe_loss" not in r for r in rows)
    a = next(iter(summary["arms"].values()))
    assert a["probe_loss_after"] is None and a["forgetting_after"] is None
    assert a["learning_after"] is not None


def test_a_probe_file_replaces_the_builtin(tmp_path: Path) -> None:
    path = tmp_path / "probe.txt"
    path.write_text("plain general text. " * 40)
    lm = load_model("random:gpt2")
    probe = build_probe(str(path), lm.tokenizer, 32, 3)
    assert probe.source.endswith("probe.txt") or str(path) in probe.source
    assert len(probe.windows) == 3


@pytest.mark.parametrize(("spec", "words"), [
    ("missing-probe.txt", "does not exist (data.probe_corpus)"),
    ("builtin:nope", "no built-in probe text"),
])
def test_bad_probe_specs_are_one_line_errors(spec: str, words: str) -> None:
    with pytest.raises(PfreezeError, match=words.replace("(", r"\(").replace(")", r"\)")):
        read_probe_text(spec)


def test_probe_shorter_than_a_window_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("too short")
    lm = load_model("random:gpt2")
    with pytest.raises(PfreezeError, match="less than one window"):
        build_probe(str(path), lm.tokenizer, 32, 3)


def test_report_shows_the_probe_of_a_finished_and_a_killed_run(tiny_run: TinyRun,
                                                               tmp_path: Path) -> None:
    import shutil

    from pfreeze.outputs.report import render_report

    for f in ("config.yaml", "metrics.jsonl", "summary.json"):
        shutil.copy(tiny_run.dir / f, tmp_path / f)
    a = tiny_run.summary["arms"]["full"]
    cell = (f"{a['probe_loss_before']:.3f} → {a['probe_loss_after']:.3f} "
            f"({a['forgetting_after']:+.3f})")
    assert cell in render_report(tmp_path)["md"].read_text()
    (tmp_path / "summary.json").unlink()  # killed: the probe comes from the eval rows
    assert cell in render_report(tmp_path)["md"].read_text()
