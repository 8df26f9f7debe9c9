"""The measurement moments of a run, for every arm at once.

    held-out loss   before, every eval_steps, after; the best point, early stopping, keep_best
    p               sampling before and after training, and at each arm's best point

Before training every arm is θ₀ (proven by hash), so those measurements run once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from pfreeze.evaluate import generate_samples, mean_loss, p_stats

if TYPE_CHECKING:  # the loop imports this module
    from pfreeze.arms import ArmRun
    from pfreeze.train import Loop


def shared_theta0(loop: Loop, step: int) -> bool:
    """Before training every arm is θ₀ (proven by hash): measure once, report for all."""
    return step == 0 and len({a.theta0_hash for a in loop.arms}) == 1


def evaluate_arms(loop: Loop, step: int) -> None:
    """Held-out and training-text loss of every arm at `step`, into metrics.jsonl."""
    rows, bs = [], loop.t.per_device_train_batch_size
    shared = None
    for arm in loop.arms:
        if arm.diverged:
            arm.evals.append((step, None, None))
            continue
        if arm.stopped:  # early-stopped: unchanged since its last evaluation
            continue
        if shared is None or not shared_theta0(loop, step):
            val = mean_loss(arm.model, loop.val_windows, bs, loop.device, loop.bf16)
            tr = mean_loss(arm.model, loop.train_windows, bs, loop.device, loop.bf16)
            shared = (val, tr)
        val, tr = shared
        arm.evals.append((step, val, tr))
        track_best(loop, arm, step, val)
        rows.append({"kind": "eval", "step": step, "arm": arm.strategy.name,
                     "val_loss": val, "train_loss": tr})
    loop.files.append_metrics(rows)


def track_best(loop: Loop, arm: ArmRun, step: int, val: float | None) -> None:
    """Remember the best held-out point; stop the arm after `patience` evals without one."""
    if val is None:
        return
    if arm.best is None or val < arm.best[1]:
        arm.best, arm.bad_evals = (step, val), 0
        if loop.t.keep_best:
            arm.best_state = arm.strategy.trained_tensors(arm.model)
        return
    arm.bad_evals += 1
    patience = loop.t.early_stopping_patience
    if patience and arm.bad_evals >= patience and arm.stopped is None:
        arm.stopped = (f"early stop at step {step}: held-out loss did not improve for "
                       f"{patience} evaluations (best {arm.best[1]:.4f} at step {arm.best[0]})")


def _generation(loop: Loop) -> Any:
    """The generation settings with the decoder this run resolved (kept across a resume)."""
    return loop.cfg.generation.model_copy(update={"decoder": loop.decoder})


def sample_arms(loop: Loop, moment: str) -> dict[str, dict[str, Any]]:
    """Samples of every arm at `moment` (before/after) into samples.txt; p statistics."""
    out: dict[str, dict[str, Any]] = {}
    samples = None
    for arm in loop.arms:
        if arm.diverged:  # a diverged model cannot sample
            out[arm.strategy.name] = {"mean": None, "std": None, "ci95": [None, None],
                                      "n": 0, "values": []}
            continue
        if samples is None or not (moment == "before" and shared_theta0(loop, 0)):
            samples = generate_samples(arm.model, loop.lm.tokenizer, _generation(loop),
                                       loop.stats.top_set, loop.device, loop.bf16)
        loop.files.add_samples(arm.strategy.name, moment, samples)
        out[arm.strategy.name] = p_stats(samples)
    return out


@torch.no_grad()
def sample_best(loop: Loop) -> dict[str, dict[str, Any]]:
    """p with each arm's best-point tensors (keep_best), so arms compare at their best too.

    The best tensors are swapped in for the sampling and the last-step ones put back.
    """
    out: dict[str, dict[str, Any]] = {}
    for arm in loop.arms:
        if arm.diverged or not arm.best_state or arm.best is None:
            continue
        params = arm.freezer.params
        last = {n: params[n].detach().clone() for n in arm.best_state}
        for n, t in arm.best_state.items():
            params[n].copy_(t)
        samples = generate_samples(arm.model, loop.lm.tokenizer, _generation(loop),
                                   loop.stats.top_set, loop.device, loop.bf16)
        loop.files.add_samples(arm.strategy.name, f"best(step {arm.best[0]})", samples)
        out[arm.strategy.name] = p_stats(samples)
        for n, t in last.items():
            params[n].copy_(t)
    return out
