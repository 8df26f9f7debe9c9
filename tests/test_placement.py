"""arms_placement: sequential trains the arms one after the other on the identical batch
stream (same batch hashes, same θ₀ hash, same evaluation moments) and, on the CPU, gives the
same losses as together; auto picks from the memory plan. A sequential run checkpoints during
each arm's turn and between turns; killed or interrupted in any turn, its resume gives the
uninterrupted run's metrics, summary and trained tensors."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import read_rows, rows_of
from safetensors.torch import load_file

from pfreeze.config import RunConfig
from pfreeze.errors import PfreezeError
from pfreeze.outputs.files import RunFiles
from pfreeze.outputs.report import render_report
from pfreeze.plan import memory
from pfreeze.run.fit import memory_plan
from pfreeze.run.interrupts import Interrupted
from pfreeze.run.loop import Loop
from pfreeze.run.session import run_loop

ARMS = ("model.name=random:llama", "training.max_steps=4", "training.weight_decay=0.1",
        "arms=[{kind: full}, {kind: plan, name: qkv, select: 'layers=2: roles=q,k,v'}, "
        "{kind: unfreeze, every: 2}]")


def _run(make_config: Callable[..., RunConfig], out: Path, *extra: str,
         on_step: Callable[[int, dict], None] | None = None, resume: bool = False
         ) -> tuple[Loop, dict]:
    loop = Loop(make_config(*ARMS, *extra), RunFiles(out, overwrite=not resume), on_step)
    return loop, run_loop(loop, resume=resume)


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
    # Checkpoints do not change the choice (sequential runs checkpoint too), and a resume
    # keeps the placement its checkpoint was made in, though the arms now fit together.
    with pytest.raises(Killed):
        _run(make_config, tmp_path / "c", "training.save_steps=2", on_step=_at(6, _kill))
    assert _state(tmp_path / "c") == (1, 2, ["qkv"], ["full"])
    monkeypatch.undo()
    _, summary = _run(make_config, tmp_path / "c", "training.save_steps=2", resume=True)
    assert summary["execution"]["arms_placement"] == "sequential"
    _assert_same_run(tmp_path / "a", tmp_path / "c")


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


SEQ = ("arms_placement=sequential", "training.save_steps=2")
# What differs between two runs of the same config: clocks (and memory, None on a CPU).
CLOCKS = {"step_time_s", "tokens_per_s", "total_time_s", "median_step_time_s",
          "first_step_time_s", "created", "wall_time_s"}


class Killed(Exception):
    """Raised from on_step: the process dies there, as under SIGKILL (nothing more written)."""


def _at(n: int, act: Callable[[], None]) -> Callable[[int, dict], None]:
    """on_step doing `act` after the run's n-th step, counted over the turns."""
    calls: list[int] = []

    def on_step(step: int, last: dict) -> None:
        calls.append(step)
        if len(calls) == n:
            act()

    return on_step


def _kill() -> None:
    raise Killed


def _state(out: Path) -> tuple[int, int, list[str], list[str]]:
    """The checkpoint's turn, step, arms held and arms finished."""
    s = json.loads((out / "checkpoint" / "state.json").read_text())
    assert s["placement"] == "sequential"
    seq = s["sequential"]
    return seq["turn"], s["step"], [a["name"] for a in s["arms"]], list(seq["finished"])


def _timeless(x: object) -> object:
    if isinstance(x, dict):
        return {k: _timeless(v) for k, v in x.items() if k not in CLOCKS}
    return [_timeless(v) for v in x] if isinstance(x, list) else x


def _assert_same_run(straight: Path, out: Path) -> None:
    """metrics.jsonl row by row, the summary and samples, the arms' tensors: bit for bit."""
    assert _timeless(read_rows(out)) == _timeless(read_rows(straight))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (straight, out))
    assert b["status"] == "finished"
    assert _timeless(b["arms"]) == _timeless(a["arms"])
    assert (out / "samples.jsonl").read_text() == (straight / "samples.jsonl").read_text()
    for arm in ("full", "qkv", "unfreeze"):
        x, y = (load_file(str(d / "arms" / arm / "trained.safetensors")) for d in (straight, out))
        assert x.keys() == y.keys() and x
        assert all(torch.equal(x[k], y[k]) for k in x), arm


def test_a_killed_sequential_run_resumes_in_its_turn(make_config: Callable[..., RunConfig],
                                                     tmp_path: Path) -> None:
    straight, out = tmp_path / "straight", tmp_path / "killed"
    _run(make_config, straight, *SEQ)
    # Killed mid-turn of the first arm, after its step-2 checkpoint.
    with pytest.raises(Killed):
        _run(make_config, out, *SEQ, on_step=_at(3, _kill))
    assert _state(out) == (0, 2, ["full"], [])
    assert not (out / "summary.json").exists()
    # Resumed, and killed at the first step of the second turn: the checkpoint between the
    # turns holds no arm, the first arm's files are written and its summary kept.
    with pytest.raises(Killed):
        _run(make_config, out, *SEQ, on_step=_at(3, _kill), resume=True)
    assert _state(out) == (1, 0, [], ["full"])
    assert (out / "arms" / "full" / "trained.safetensors").exists()
    # Resumed, and killed mid-turn of the second arm, after its step-2 checkpoint.
    with pytest.raises(Killed):
        _run(make_config, out, *SEQ, on_step=_at(3, _kill), resume=True)
    assert _state(out) == (1, 2, ["qkv"], ["full"])
    _, summary = _run(make_config, out, *SEQ, resume=True)
    assert summary["execution"]["arms_placement"] == "sequential"
    _assert_same_run(straight, out)


def test_sigterm_in_a_sequential_run_checkpoints_at_the_step(
        make_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    straight, out = tmp_path / "straight", tmp_path / "run"
    _run(make_config, straight, *SEQ)
    with pytest.raises(Interrupted) as e:  # at step 3 of the second arm's turn
        _run(make_config, out, *SEQ,
             on_step=_at(7, lambda: os.kill(os.getpid(), signal.SIGTERM)))
    assert e.value.step == 3 and "checkpoint at step 3 of arm 'qkv' kept" in e.value.note
    assert _state(out) == (1, 3, ["qkv"], ["full"])  # saved at the signal, not at save_steps
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupted_at_step"] == 3
    arms = summary["arms"]
    assert list(arms) == ["full", "qkv"]  # the third arm's turn never came
    assert arms["full"]["p_after"] is not None and arms["full"]["integrity"]["ok"]
    assert arms["qkv"]["steps"] == 3 and arms["qkv"]["p_after"] is None
    _run(make_config, out, *SEQ, resume=True)
    _assert_same_run(straight, out)


def test_a_file_an_earlier_turn_lost_is_not_promised_to_a_resume(
        make_config: Callable[..., RunConfig], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import pfreeze.outputs.files

    save_file = pfreeze.outputs.files.save_file

    def full_disk_for_the_first_arm(tensors: dict, path: str, *args: object) -> None:
        if f"{os.sep}full{os.sep}" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        save_file(tensors, path, *args)

    monkeypatch.setattr(pfreeze.outputs.files, "save_file", full_disk_for_the_first_arm)
    out = tmp_path / "run"
    with pytest.raises(PfreezeError) as e:  # the other arms still took their turns
        _run(make_config, out, *SEQ)
    assert "arms/full/trained.safetensors could not be written" in e.value.problem
    assert "--resume" not in e.value.fix and "run it again" in e.value.fix
    summary = json.loads((out / "summary.json").read_text())
    assert [m["file"] for m in summary["missing_outputs"]] == ["arms/full/trained.safetensors"]
    assert (out / "arms" / "unfreeze" / "trained.safetensors").exists()
