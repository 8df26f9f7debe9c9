"""arms_placement: sequential trains the arms one after the other on the identical batch
stream (same batch hashes, same θ₀ hash, same evaluation moments) and, on the CPU, gives the
same losses as together; auto picks from the memory plan."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import read_rows, rows_of

from pfreeze.config import RunConfig
from pfreeze.errors import PfreezeError
from pfreeze.outputs.files import RunFiles
from pfreeze.outputs.report import render_report
from pfreeze.plan import memory
from pfreeze.run.fit import memory_plan
from pfreeze.run.loop import Loop
from pfreeze.run.session import run_loop

ARMS = ("model.name=random:llama", "training.max_steps=4", "training.weight_decay=0.1",
        "arms=[{kind: full}, {kind: plan, name: qkv, select: 'layers=2: roles=q,k,v'}, "
        "{kind: unfreeze, every: 2}]")


def _run(make_config: Callable[..., RunConfig], out: Path, *extra: str) -> tuple[Loop, dict]:
    loop = Loop(make_config(*ARMS, *extra), RunFiles(out))
    return loop, run_loop(loop)


def _train_rows(out: Path) -> dict[str, list[tuple]]:
    rows = read_rows(out)
    return {arm: [(r["step"], r["batch_hash"], r["loss"]) for r in rows_of(rows, "train", arm)]
            for arm in ("full", "qkv", "unfreeze")}


def _eval_rows(out: Path) -> dict[str, list[tuple]]:
    rows = read_rows(out)
    return {arm: [(r["step"], r["val_loss"]) for r in rows_of(rows, "eval", arm)]
            for arm in ("full", "qkv", "unfreeze")}


def test_sequential_equals_together_on_the_cpu(make_config: Callable[..., RunConfig],
                                                tmp_path: Path) -> None:
    _, together = _run(make_config, tmp_path / "t", "arms_placement=together")
    loop, sequential = _run(make_config, tmp_path / "s", "arms_placement=sequential")
    assert together["execution"]["arms_placement"] == "together"
    assert sequential["execution"]["arms_placement"] == "sequential"
    assert sequential["theta0_hash"] == together["theta0_hash"]
    assert list(sequential["arms"]) == list(together["arms"])
    for name, arm in together["arms"].items():
        seq = sequential["arms"][name]
        assert seq["theta0_hash"] == arm["theta0_hash"]
        for key in ("steps", "last_loss", "val_loss_after", "trainable_params", "p_after"):
            assert seq[key] == arm[key], (name, key)
        assert seq["integrity"]["ok"]
    # Same batches, same losses, same evaluation moments, arm by arm.
    assert _train_rows(tmp_path / "s") == _train_rows(tmp_path / "t")
    assert _eval_rows(tmp_path / "s") == _eval_rows(tmp_path / "t")
    assert len(loop.arms) == 1  # one arm held at a time
    # The report has the same form either way.
    forms = []
    for out in (tmp_path / "t", tmp_path / "s"):
        md = render_report(out)["md"].read_text(encoding="utf-8")
        forms.append([line for line in md.splitlines() if line.startswith("#")])
    assert forms[0] == forms[1] and len(forms[0]) > 3


def test_auto_goes_sequential_when_the_arms_do_not_fit_together(
        make_config: Callable[..., RunConfig], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    plan = memory_plan(make_config(*ARMS), torch.device("cpu"), bf16=False)
    assert plan.alone < plan.together
    monkeypatch.setattr(memory, "free_bytes", lambda device: plan.alone)
    _, summary = _run(make_config, tmp_path / "a")
    assert summary["execution"]["arms_placement"] == "sequential"
    with pytest.raises(PfreezeError, match="arms_placement=sequential"):
        _run(make_config, tmp_path / "b", "arms_placement=together")
    with pytest.raises(PfreezeError, match="save_steps"):
        _run(make_config, tmp_path / "c", "arms_placement=sequential", "training.save_steps=2")


def test_sequential_with_early_stopping_matches_together(
        make_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    # A high rate and patience 1: some arm stops before the others (fewer batches seen).
    extra = ("training.early_stopping_patience=1", "training.eval_steps=1",
             "training.learning_rate=0.05", "training.max_steps=6")
    _, together = _run(make_config, tmp_path / "t", "arms_placement=together", *extra)
    _, sequential = _run(make_config, tmp_path / "s", "arms_placement=sequential", *extra)
    assert {n: (a["status"], a["steps"]) for n, a in sequential["arms"].items()} == \
        {n: (a["status"], a["steps"]) for n, a in together["arms"].items()}
    assert _train_rows(tmp_path / "s") == _train_rows(tmp_path / "t")
