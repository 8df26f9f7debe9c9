"""The run's files when several ranks train its arms: rank 0 writes them, the others send.

`GatheredFiles` stands in for `RunFiles` on every rank of a distributed run. The loop and the
session call it exactly as they call RunFiles, at the same points on every rank (every flush
and every evaluation append metrics, even with no rows), so those calls are the collectives:
  - metric rows of every rank reach rank 0, put in the order one process would write them
    (by the arm's place in the config; a stable sort keeps each arm's steps in order), and the
    batch hashes of one step must agree across arms (the proof of one batch stream);
  - samples are held where they were drawn and travel with the next collective, and so do
    whether a rank's arms have all stopped and a signal it noted (the session's stop tests
    need no collective of their own);
  - rank 0 alone starts, resumes and clears the directory and writes the summary;
  - each arm's lead rank writes its own `arms/<name>/` (its tensors never cross ranks).
A rank that replicates an arm (data parallel) but does not lead it sends nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from torch import nn

from pfreeze.errors import PfreezeError
from pfreeze.outputs.files import RunFiles
from pfreeze.run.distributed import Placement, all_gather

_MOMENTS = {"before": 0, "after": 1}  # then best(step n): the order one process samples in


class GatheredFiles:
    """RunFiles for a rank of a distributed run (see the module docstring)."""

    def __init__(self, files: RunFiles, placement: Placement, names: list[str],
                 stopped: Callable[[], bool]) -> None:
        self.inner, self.placement, self.world = files, placement, placement.world
        self.order = {n: i for i, n in enumerate(names)}
        self.held: list[tuple[str, str, list[Any]]] = []  # samples not yet sent
        # Whether this rank's arms have all stopped, and every rank's after the last
        # collective: arms stop only at a flush or an evaluation, both of which pass here.
        self.stopped, self.all_stopped = stopped, False
        self.last: dict[str, float] = {}  # rank 0: every arm's latest loss (the progress line)
        # A signal noted on this rank (Signals.pending while the ranks train), and the first
        # one any rank had noted at the last collective.
        self.signal: Callable[[], int | None] = lambda: None
        self.signal_seen: int | None = None

    def __getattr__(self, name: str) -> Any:  # root, samples, jsonl, loggers, ...
        return getattr(self.inner, name)

    # ------------------------------------------------------------ rank 0 alone
    def check_target(self) -> None:
        if self.world.is_main:
            self.inner.check_target()

    def check_free(self, config_yaml: str) -> None:
        if self.world.is_main:
            self.inner.check_free(config_yaml)

    def start(self, config_yaml: str) -> None:
        if self.world.is_main:
            self.inner.start(config_yaml)

    def resume(self, state: dict[str, Any]) -> None:
        if self.world.is_main:
            self.inner.resume(state)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.world.is_main:
            self.inner.write_summary(summary)

    def open_trackers(self, cfg: Any, fresh: bool) -> None:
        """One tracker run for the whole run (a W&B or MLflow run per rank would split it)."""
        if self.world.is_main:
            self.inner.open_trackers(cfg, fresh)

    # ------------------------------------------------------------ collectives
    def append_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Every rank's rows and held samples to rank 0, written there in one process's order;
        whether every rank's arms have stopped, to every rank."""
        sent = (rows, self.held) if self.placement.reports else ([], [])
        self.held = []
        got = all_gather(self.world, (*sent, bool(self.stopped()), self.signal()))
        self.all_stopped = all(stop for _, _, stop, _ in got)
        self.signal_seen = next((s for *_, s in got if s is not None), None)
        if not self.world.is_main:
            return
        merged = sorted((r for rs, *_ in got for r in rs), key=lambda r: self.order[r["arm"]])
        _check_batches(merged)
        self.last = {r["arm"]: r["loss"] for r in merged
                     if r["kind"] == "train" and r["loss"] is not None}
        if merged:
            self.inner.append_metrics(merged)
        samples = [s for _, ss, *_ in got for s in ss]
        samples.sort(key=lambda s: (_MOMENTS.get(s[1], 2), self.order[s[0]]))
        for arm, moment, drawn in samples:
            self.inner.add_samples(arm, moment, drawn)

    def sync(self) -> None:
        """Send held samples now (before a checkpoint records them)."""
        self.append_metrics([])

    def close_metrics(self) -> list[dict[str, str]]:
        self.sync()
        return self.inner.close_metrics() if self.world.is_main else []

    # ------------------------------------------------------------ per rank
    def add_samples(self, arm: str, moment: str, samples: list[Any]) -> None:
        self.held.append((arm, moment, samples))

    def save_arm(self, strategy: Any, model: nn.Module, tokenizer: Any, pretrained: bool,
                 best: dict[str, Any] | None = None, theta0_hash: str | None = None
                 ) -> list[dict[str, str]]:
        if not self.placement.reports:
            return []
        return self.inner.save_arm(strategy, model, tokenizer, pretrained, best, theta0_hash)


def _check_batches(rows: list[dict[str, Any]]) -> None:
    """One batch per step for every arm: their batch hashes agree."""
    seen: dict[int, set[str]] = defaultdict(set)
    for r in rows:
        if r.get("kind") == "train":
            seen[r["step"]].add(r["batch_hash"])
    for step, hashes in seen.items():
        if len(hashes) > 1:
            raise PfreezeError(f"the ranks drew different batches at step {step}",
                               "this is a pfreeze bug; please report it with the config")
