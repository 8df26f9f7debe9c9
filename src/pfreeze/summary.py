"""summary.json: what a finished run reports, per arm and for the run as a whole."""

from __future__ import annotations

import math
import statistics
import time
from typing import TYPE_CHECKING, Any

from pfreeze import __version__, execution
from pfreeze.models import count_params
from pfreeze.moments import shared_theta0
from pfreeze.outputs import environment

if TYPE_CHECKING:  # the loop imports this module
    from pfreeze.arms import ArmRun
    from pfreeze.train import Loop


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN


def arm_summary(loop: Loop, arm: ArmRun, p_before: dict | None, p_after: dict | None,
                p_best: dict | None, audit: dict | None) -> dict[str, Any]:
    """One arm's figures; p_after and the audit are None for a run interrupted before its
    end (and p_before too when it stopped during the first sampling)."""
    vals = [(s, v) for s, v, _ in arm.evals if v is not None]
    best = min(vals, key=lambda sv: sv[1]) if vals else (None, None)
    median = statistics.median(arm.times) if arm.times else None
    return {
        "kind": arm.strategy.cfg.kind,
        "description": arm.strategy.describe(),
        "status": f"stopped: {arm.stopped}" if arm.stopped else "finished",
        "trainable_params": arm.strategy.ever_trainable(),
        "total_params": count_params(arm.model),
        "theta0_hash": arm.theta0_hash,
        "steps": len(arm.losses),
        "total_time_s": sum(arm.times),
        "median_step_time_s": median,
        # Steady state: compilation and warm-up land in the first step, reported apart.
        "tokens_per_s": loop.stream.batch * loop.stream.block / median if median else None,
        "first_step_time_s": arm.times[0] if arm.times else None,
        "compiled": loop.compile,
        "prefix_cache": arm.prefix_summary(),
        "mean_loss": _finite(statistics.fmean(arm.losses)) if arm.losses else None,
        "last_loss": _finite(arm.losses[-1]) if arm.losses else None,
        "val_loss_before": arm.evals[0][1] if arm.evals else None,
        "val_loss_best": best[1], "val_loss_best_step": best[0],
        "val_loss_after": arm.evals[-1][1] if p_after is not None else None,
        "train_loss_after": arm.evals[-1][2] if p_after is not None else None,
        "peak_mem_mb": arm.peak_mem_mb,
        "p_before": p_before, "p_after": p_after,
        "integrity": audit,
        "p_best": p_best,
        # ‖ΔW‖ keys of matrices this arm never trains: exact zeros, not a measured 0.
        "tracked_frozen": arm.tracker.frozen_keys,
    }


def run_summary(loop: Loop, wall: float | None, arms: dict[str, dict[str, Any]],
                status: str = "finished") -> dict[str, Any]:
    return {
        "pfreeze_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": loop.command,  # set by the CLI; None for runs from the Python API
        "status": status,
        "environment": {**environment(loop.device), "bf16": loop.bf16},
        # What the auto settings resolved to on this device.
        "execution": {**execution.reported(loop),
                      # Per arm, peak_mem_mb counts what a step allocates; CUDA-graph pools
                      # are reserved apart, for all arms together (after a resume, the larger
                      # of the two processes' peaks).
                      "gpu_reserved_peak_mb": loop.reserved_mb or None},
        "model": {"name": loop.lm.name, "architecture": loop.lm.family, **loop.base_info},
        "config": loop.cfg.model_dump(mode="json"),
        "corpus": loop.corpus,
        "theta0_hash": loop.theta0_hash,
        # Identical θ₀ hashes mean identical models: the before-measurements ran once.
        "before_measured_once": shared_theta0(loop, 0),
        "wall_time_s": wall,
        "arms": arms,
    }
