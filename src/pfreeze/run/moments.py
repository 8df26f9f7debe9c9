"""The measurement moments of a run, for every arm at once.

    held-out loss   before, every eval_steps, after; the best point, early stopping, keep_best
    probe loss      the same moments, on the forgetting probe's text (pfreeze.measure.probe)
    p               sampling before and after training, and at each arm's best point

Before training every arm is θ₀ (proven by hash), so those measurements run once.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch

from pfreeze.measure.generation import generate_samples, p_stats
from pfreeze.measure.heldout import mean_loss
from pfreeze.measure.probe import probe_loss
from pfreeze.outputs.files import RunFiles
from pfreeze.run.arm_run import ArmRun
from pfreeze.run.runtime import Runtime
from pfreeze.settings import GenerationConfig, TrainingConfig

NO_P = {"mean": None, "std": None, "ci95": [None, None], "n": 0, "values": []}


@dataclass
class Moments:
    """What every measurement moment needs: the arms, the fixed inputs, where rows go."""

    arms: list[ArmRun]
    rt: Runtime  # device, precision, and the sampler a resumed run keeps
    val_windows: torch.Tensor
    train_windows: torch.Tensor
    t: TrainingConfig  # eval batch size, keep_best, early stopping
    generation: GenerationConfig
    tokenizer: Any
    top_set: Collection[int]
    files: RunFiles
    probe_windows: torch.Tensor | None = None  # the forgetting probe's; None: probe off

    def shared_theta0(self, step: int) -> bool:
        """Before training every arm is θ₀ (proven by hash): measure once, report for all."""
        return step == 0 and len({a.theta0_hash for a in self.arms}) == 1

    def evaluate(self, step: int) -> None:
        """Held-out, training-text and probe loss of every arm at `step`, into metrics.jsonl."""
        rows, bs, rt = [], self.t.per_device_train_batch_size, self.rt
        shared = None
        for arm in self.arms:
            if arm.diverged:
                arm.evals.append((step, None, None, None))
                continue
            if arm.stopped:  # early-stopped: unchanged since its last evaluation
                continue
            if shared is None or not self.shared_theta0(step):
                probe = (None if self.probe_windows is None else
                         probe_loss(arm.model, self.probe_windows, bs, rt.device, rt.bf16))
                shared = (mean_loss(arm.model, self.val_windows, bs, rt.device, rt.bf16),
                          mean_loss(arm.model, self.train_windows, bs, rt.device, rt.bf16), probe)
            val, tr, probe = shared
            arm.evals.append((step, val, tr, probe))
            self._track_best(arm, step, val)
            rows.append({"kind": "eval", "step": step, "arm": arm.strategy.name,
                         "val_loss": val, "train_loss": tr,
                         **({} if self.probe_windows is None else {"probe_loss": probe})})
        self.files.append_metrics(rows)

    def _track_best(self, arm: ArmRun, step: int, val: float | None) -> None:
        """Remember the best held-out point; stop the arm after `patience` evals without one."""
        if val is None:
            return
        if arm.best is None or val < arm.best[1]:
            arm.best, arm.bad_evals = (step, val), 0
            if self.t.keep_best:
                arm.best_state = arm.strategy.trained_tensors(arm.model)
            return
        arm.bad_evals += 1
        patience = self.t.early_stopping_patience
        if patience and arm.bad_evals >= patience and arm.stopped is None:
            arm.stopped = (f"early stop at step {step}: held-out loss did not improve for "
                           f"{patience} evaluations (best {arm.best[1]:.4f} at step "
                           f"{arm.best[0]})")

    def _samples(self, arm: ArmRun) -> list[Any]:
        # The decoder this run resolved (kept across a resume).
        generation = self.generation.model_copy(update={"decoder": self.rt.decoder})
        return generate_samples(arm.model, self.tokenizer, generation, self.top_set,
                                self.rt.device, self.rt.bf16)

    def sample(self, moment: str) -> dict[str, dict[str, Any]]:
        """Samples of every arm at `moment` (before/after) into the samples files; p stats."""
        out: dict[str, dict[str, Any]] = {}
        samples = None
        for arm in self.arms:
            if arm.diverged:  # a diverged model cannot sample
                out[arm.strategy.name] = dict(NO_P)
                continue
            if samples is None or not (moment == "before" and self.shared_theta0(0)):
                samples = self._samples(arm)
            self.files.add_samples(arm.strategy.name, moment, samples)
            out[arm.strategy.name] = p_stats(samples)
        return out

    @torch.no_grad()
    def sample_best(self) -> dict[str, dict[str, Any]]:
        """p with each arm's best-point tensors (keep_best), so arms compare at their best too.

        The best tensors are swapped in for the sampling and the last-step ones put back.
        """
        out: dict[str, dict[str, Any]] = {}
        for arm in self.arms:
            if arm.diverged or not arm.best_state or arm.best is None:
                continue
            params = arm.freezer.params
            last = {n: params[n].detach().clone() for n in arm.best_state}
            for n, t in arm.best_state.items():
                params[n].copy_(t)
            samples = self._samples(arm)
            self.files.add_samples(arm.strategy.name, f"best(step {arm.best[0]})", samples)
            out[arm.strategy.name] = p_stats(samples)
            for n, t in last.items():
                params[n].copy_(t)
        return out
