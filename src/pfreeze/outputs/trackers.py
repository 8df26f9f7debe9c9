"""Experiment trackers (training.report_to): TensorBoard, Weights & Biases, MLflow, trackio.

Each is a MetricLogger (pfreeze.outputs.loggers) beside metrics.jsonl, which stays the run's
own record: the trackers get the same rows, every step's and every evaluation's, of every arm,
and the resolved config once when they open. Each client is an optional package imported only
when named (`pip install 'pfreeze[trackers]'`).

    tensorboard  one run per arm: <output_dir>/tensorboard/<arm>/, tags train/loss, eval/val_loss,
                 dw/<matrix>, dw0/<matrix>; the config as text
    wandb        one run (project $WANDB_PROJECT, else pfreeze), keys <arm>/train/loss ...
                 against the `step` metric (arms that run one after another restart it);
                 files under <output_dir>/wandb/; WANDB_MODE=offline works as ever
    mlflow       one run in $MLFLOW_EXPERIMENT_NAME (else pfreeze) at $MLFLOW_TRACKING_URI
                 (else mlflow's default), metrics <arm>/train/loss ..., the config as params
    trackio      one run in project $TRACKIO_PROJECT (else pfreeze), keys as for wandb

A tracker that fails while the run goes on (a lost connection) is dropped with one warning:
training and metrics.jsonl go on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from pfreeze.errors import PfreezeError
from pfreeze.outputs.loggers import MetricLogger, Row

# report_to name -> (the module it imports, the pip package that provides it)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow-skinny"), "trackio": ("trackio", "trackio")}
_NOT_FIGURES = ("kind", "step", "arm", "batch_hash")


def check(names: list[str]) -> None:
    """Refuse, before anything loads, a tracker whose package is not installed."""
    for name in names:
        if name in TRACKERS and importlib.util.find_spec(TRACKERS[name][0]) is None:
            raise PfreezeError(
                f"training.report_to names {name}, but its package ({TRACKERS[name][1]}) is "
                "not installed",
                f"pip install 'pfreeze[trackers]' (or pip install {TRACKERS[name][1]})")


def scalars(row: Row) -> dict[str, float]:
    """A metrics row's figures as flat names: train/loss, eval/val_loss, dw/<matrix>, ..."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in _NOT_FIGURES:
            continue
        if isinstance(value, dict):  # the per-matrix ‖ΔW‖ norms
            out.update({f"{key}/{k}": float(v) for k, v in value.items() if _figure(v)})
        elif _figure(value):
            out[f"{row['kind']}/{key}"] = float(value)
    return out


def _figure(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def open_trackers(names: list[str], root: Path, config: dict[str, Any],
                  run_name: str) -> list[MetricLogger]:
    """A started tracker for each name but jsonl (metrics.jsonl is always written)."""
    makers = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow, "trackio": Trackio}
    opened: list[MetricLogger] = []
    try:
        for name in dict.fromkeys(names):
            if name in makers:
                opened.append(Guarded(name, makers[name](root, config, run_name)))
    except PfreezeError:
        for tracker in opened:
            tracker.close()
        raise
    except Exception as e:  # credentials, a store that cannot be made, a server away
        for tracker in opened:
            tracker.close()
        raise PfreezeError(f"training.report_to: {name} did not start ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:300]})",
                           f"fix its setup, or drop {name} from training.report_to") from None
    return opened


class Guarded:
    """One tracker; its first failure is a warning and the end of it, not of the run."""

    def __init__(self, name: str, tracker: Any) -> None:
        self.name, self.tracker, self.failed = name, tracker, False

    def _call(self, what: str, *args: Any) -> None:
        if self.failed:
            return
        try:
            getattr(self.tracker, what)(*args)
        except Exception as e:
            self.failed = True
            print(f"warning: the {self.name} tracker failed ({type(e).__name__}: "
                  f"{' '.join(str(e).split())[:200]}); it gets no more metrics, "
                  "metrics.jsonl has them all", file=sys.stderr)

    def log(self, rows: list[Row]) -> None:
        self._call("log", rows)

    def close(self) -> None:
        self._call("close")


class TensorBoard:
    """One event-file folder per arm, so the arms overlay in TensorBoard's runs."""

    def __init__(self, root: Path, config: dict[str, Any], run_name: str) -> None:
        self.dir = root / "tensorboard"
        self.text = "    " + yaml.safe_dump(config, sort_keys=False).replace("\n", "\n    ")
        self.writers: dict[str, Any] = {}

    def _writer(self, arm: str) -> Any:
        if arm not in self.writers:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(self.dir / arm))
            writer.add_text("config", self.text, 0)  # markdown: indented = verbatim
            self.writers[arm] = writer
        return self.writers[arm]

    def log(self, rows: list[Row]) -> None:
        for row in rows:
            writer = self._writer(row["arm"])
            for tag, value in scalars(row).items():
                writer.add_scalar(tag, value, row["step"])
        for writer in self.writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def _by_arm(row: Row) -> dict[str, float]:
    return {f"{row['arm']}/{k}": v for k, v in scalars(row).items()}


class WandB:
    def __init__(self, root: Path, config: dict[str, Any], run_name: str) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "pfreeze"), name=run_name,
                              dir=str(root), config=config, reinit="create_new")
        # Steps restart where arms run one after another: `step` is the x-axis, not W&B's own.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, rows: list[Row]) -> None:
        for row in rows:
            self.run.log({"step": row["step"], **_by_arm(row)})

    def close(self) -> None:
        self.run.finish()


class MLflow:
    _BATCH = 1000  # MLflow's limit of metrics per log_batch

    def __init__(self, root: Path, config: dict[str, Any], run_name: str) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient()
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "pfreeze")
        experiment = self.client.get_experiment_by_name(name)
        eid = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(eid, run_name=run_name).info.run_id
        params = [Param(k, v) for k, v in _flat(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, rows: list[Row]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, row["step"]) for row in rows for k, v in _by_arm(row).items()]
        for i in range(0, len(metrics), self._BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + self._BATCH])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """data.block_size -> "32": sections flattened, lists as JSON, each at most 500 chars."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[f"{prefix}{key}"] = text[:500]
    return out


class Trackio:
    def __init__(self, root: Path, config: dict[str, Any], run_name: str) -> None:
        import trackio

        self.trackio = trackio
        # trackio prints a banner on stdout, which is pfreeze's progress display here.
        with contextlib.redirect_stdout(io.StringIO()):
            self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "pfreeze"),
                                    name=run_name, config=config, auto_log_gpu=False,
                                    auto_log_cpu=False, embed=False)

    def log(self, rows: list[Row]) -> None:
        for row in rows:
            self.run.log(_by_arm(row), step=row["step"])

    def close(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            # The module's finish() also forgets the run, which trackio would finish again
            # (printing) at exit.
            self.trackio.finish()
