"""Experiment trackers (training.report_to): what each one holds after a run equals
metrics.jsonl, a missing package is one line with its pip command, and a tracker that fails
never costs the run."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import read_rows, rows_of

from pfreeze.errors import PfreezeError
from pfreeze.outputs import trackers
from pfreeze.outputs.trackers import Guarded, scalars

NAMES = ["tensorboard", "mlflow", "wandb", "trackio"]
INSTALLED = [n for n in NAMES if importlib.util.find_spec(trackers.TRACKERS[n][0])]


def needs(name: str) -> None:
    if name not in INSTALLED:
        pytest.skip(f"{trackers.TRACKERS[name][1]} is not installed (pip install "
                    "'pfreeze[trackers]')")


class TrackedRun:
    def __init__(self, dir: Path, rows: list[dict[str, Any]], store: Path) -> None:
        self.dir, self.rows, self.store = dir, rows, store


@pytest.fixture(scope="module")
def tracked(make_config: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
            ) -> TrackedRun:
    """One tiny run (two arms, steps 1-3, evaluations at 0, 2 and 3) into every installed
    tracker, each kept in the test's folder."""
    from pfreeze.outputs.files import RunFiles
    from pfreeze.run.loop import Loop
    from pfreeze.run.session import run_loop

    store = tmp_path_factory.mktemp("trackers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"file:{store / 'mlruns'}")
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's file store, kept for tests
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        if "trackio" in INSTALLED:
            import trackio.sqlite_storage
            import trackio.utils

            for module in (trackio.utils, trackio.sqlite_storage):
                mp.setattr(module, "TRACKIO_DIR", store / "trackio")
        # Few tracked matrices keep W&B's transaction log in one 32 KiB block (read below).
        cfg = make_config("training.report_to=[jsonl, " + ", ".join(INSTALLED) + "]",
                          "track=layers=0 roles=q,o")
        out = store / "run"
        run_loop(Loop(cfg, RunFiles(out)))
    return TrackedRun(out, read_rows(out), store)


def expected(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(arm, name) -> [(step, value)] of every figure in metrics.jsonl."""
    out: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for row in rows:
        for name, value in scalars(row).items():
            out.setdefault((row["arm"], name), []).append((row["step"], value))
    return out


def test_every_figure_has_a_flat_name() -> None:
    row = {"kind": "train", "step": 3, "arm": "full", "loss": 2.5, "lr": 1e-3,
           "batch_hash": "ab", "mem_mb": None, "tokens_per_s": float("nan"),
           "dw": {"L0.q": 0.1}, "dw0": {"L0.q": 0.2}}
    assert scalars(row) == {"train/loss": 2.5, "train/lr": 1e-3, "dw/L0.q": 0.1,
                            "dw0/L0.q": 0.2}
    assert scalars({"kind": "eval", "step": 0, "arm": "a", "val_loss": 3.0,
                    "train_loss": None}) == {"eval/val_loss": 3.0}


def test_tensorboard_events_read_back_as_metrics_jsonl(tracked: TrackedRun) -> None:
    needs("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    want = expected(tracked.rows)
    arms = {arm for arm, _ in want}
    assert arms == {"full", "plan"}
    for arm in arms:
        events = EventAccumulator(str(tracked.dir / "tensorboard" / arm),
                                  size_guidance={"scalars": 0})
        events.Reload()
        tags = events.Tags()
        assert "config" in str(tags["tensors"])
        names = {name for a, name in want if a == arm}
        assert set(tags["scalars"]) == names
        for name in names:
            got = [(e.step, e.value) for e in events.Scalars(name)]
            # Event files hold float32: the jsonl value rounded to it, exactly.
            assert got == [(s, float(np.float32(v))) for s, v in want[(arm, name)]], name
    assert {"train/loss", "eval/val_loss", "eval/train_loss", "dw/L0.q"} <= names
    evals = [s for s, _ in want[("full", "eval/val_loss")]]
    assert evals == [r["step"] for r in rows_of(tracked.rows, "eval", "full")] == [0, 2, 3]


def test_mlflow_local_store_holds_metrics_jsonl_and_the_config(tracked: TrackedRun) -> None:
    needs("mlflow")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{tracked.store / 'mlruns'}")
    experiment = client.get_experiment_by_name("pfreeze")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    for (arm, name), points in expected(tracked.rows).items():
        history = client.get_metric_history(run.info.run_id, f"{arm}/{name}")
        assert sorted((m.step, m.value) for m in history) == sorted(points), name
    params = run.data.params
    assert params["training.max_steps"] == "3" and params["model.name"] == "random:gpt2"
    assert json.loads(params["arms"])[0]["kind"] == "full"


def test_wandb_offline_run_holds_every_figure(tracked: TrackedRun) -> None:
    needs("wandb")
    (log,) = (tracked.dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = log.read_bytes()
    # W&B's transaction log: LevelDB-log blocks of 32 KiB holding protobuf records; in one
    # block, a history item is its key (field 2) followed by its JSON value (field 16).
    assert len(data) < 32768
    for (arm, name), points in expected(tracked.rows).items():
        head = bytes([len(f"{arm}/{name}")]) + f"{arm}/{name}".encode() + b"\x82\x01"
        values, at = [], data.find(head)
        while at >= 0:
            start = at + len(head) + 1
            values.append(json.loads(data[start:start + data[start - 1]]))
            at = data.find(head, start)
        # In order, among the summary records' copies of the latest value (W&B writes 0.0 as
        # 0: compared as numbers).
        want = iter(values)
        assert all(any(v == got for got in want) for _, v in points), name
        assert set(values) <= {v for _, v in points}, name
    assert b"random:gpt2" in data  # the config


def test_trackio_holds_metrics_jsonl(tracked: TrackedRun) -> None:
    needs("trackio")
    import trackio.sqlite_storage as storage

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(storage, "TRACKIO_DIR", tracked.store / "trackio")
        logs = storage.SQLiteStorage.get_logs("pfreeze", "run")
        config = storage.SQLiteStorage.get_run_config("pfreeze", "run")
    got: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for entry in logs:
        for key, value in entry.items():
            if "/" in key and isinstance(value, float):
                arm, name = key.split("/", 1)
                got.setdefault((arm, name), []).append((entry["step"], value))
    assert got == expected(tracked.rows)
    assert config["training"]["max_steps"] == 3


def test_a_missing_tracker_package_is_one_line_with_the_pip_command(
        make_config: Callable[..., Any], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pfreeze.outputs.files import RunFiles
    from pfreeze.run.loop import Loop
    from pfreeze.run.session import run_loop

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = make_config("training.report_to=[tensorboard, wandb]")
    with pytest.raises(PfreezeError) as info:
        run_loop(Loop(cfg, RunFiles(tmp_path / "run")))
    message = str(info.value)
    assert "report_to names wandb, but its package (wandb) is not installed" in message
    assert "pip install 'pfreeze[trackers]' (or pip install wandb)" in message
    assert "\n" not in message and not (tmp_path / "run").exists()


def test_a_tracker_that_cannot_start_leaves_no_run_behind(
        make_config: Callable[..., Any], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    needs("tensorboard")
    from pfreeze.outputs.files import RunFiles
    from pfreeze.run.loop import Loop
    from pfreeze.run.session import run_loop

    def refuse(*args: Any) -> None:
        raise ConnectionError("the server is away\nfor now")

    monkeypatch.setattr(trackers.TensorBoard, "__init__", refuse)
    with pytest.raises(PfreezeError, match="tensorboard did not start .ConnectionError: the "
                                           "server is away for now"):
        run_loop(Loop(make_config("training.report_to=tensorboard"), RunFiles(tmp_path / "r")))
    assert not (tmp_path / "r" / "config.yaml").exists()  # the corrected retry is not refused


def test_a_tracker_failing_mid_run_is_a_warning(capsys: pytest.CaptureFixture) -> None:
    class Flaky:
        calls = 0

        def log(self, rows: list[dict[str, Any]]) -> None:
            Flaky.calls += 1
            raise OSError("connection reset")

        def close(self) -> None:
            Flaky.calls += 1

    guarded = Guarded("mlflow", Flaky())
    guarded.log([{"kind": "train", "step": 1, "arm": "a", "loss": 1.0}])
    guarded.log([])
    guarded.close()
    assert Flaky.calls == 1
    assert "the mlflow tracker failed (OSError: connection reset)" in capsys.readouterr().err


def test_report_to_takes_one_name_and_refuses_an_unknown_one(
        make_config: Callable[..., Any]) -> None:
    assert make_config("training.report_to=tensorboard").training.report_to == ["tensorboard"]
    assert make_config("training.report_to=none").training.report_to == []
    assert make_config().training.report_to == ["jsonl"]
    with pytest.raises(PfreezeError, match="report_to"):
        make_config("training.report_to=[comet]")
