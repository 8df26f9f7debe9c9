"""One arm's live state inside the loop: its model, freezer, optimizer, schedule, ‖ΔW‖ tracker,
prefix cache, the steps queued for the next metrics flush, and what it measured so far."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pfreeze.errors import PfreezeError
from pfreeze.measure.drift import Tracker
from pfreeze.measure.probe import learning_forgetting
from pfreeze.models.load import count_params
from pfreeze.plan.masks import Freezer
from pfreeze.run.arms.base import ArmStrategy
from pfreeze.run.prefix import PrefixCache
from pfreeze.settings import TrainingConfig


def build_optimizer(params: list[nn.Parameter], t: TrainingConfig, device: torch.device
                    ) -> torch.optim.Optimizer:
    # Norms and biases are not decayed (as in HF Trainer); the Freezer keeps masked elements.
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if t.optim == "sgd":
        return torch.optim.SGD(groups, lr=t.learning_rate, momentum=t.momentum)
    fused = device.type == "cuda"
    if t.optim == "adamw_fused" and not fused:
        raise PfreezeError("optim=adamw_fused needs a CUDA GPU", "use optim=adamw on CPU")
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                             eps=t.adam_epsilon, fused=fused)


@dataclass
class StepRecord:
    """One optimizer step of one arm as the step leaves it: device tensors and timers, read
    back all at once at the next flush (reading each would make the host wait per step)."""

    step: int  # 1-based: the step just completed
    loss: torch.Tensor  # the mean loss over the step's micro-batches, on the device
    dw: torch.Tensor  # ‖W_t − W_{t−1}‖_F per tracked matrix, aligned with Tracker.keys
    dw0: torch.Tensor  # ‖W_t − W₀‖_F, likewise
    start: Any  # a CUDA event or a host time
    end: Any
    mem_mb: float | None  # peak memory allocated in the step (GPU)
    lr: float  # the learning rate the step used
    reserved_mb: float | None = None  # peak memory reserved by the process in the step (GPU)

    def seconds(self) -> float:
        if hasattr(self.start, "elapsed_time"):  # CUDA events (after a synchronize)
            return self.start.elapsed_time(self.end) / 1000
        return self.end - self.start


@dataclass
class ArmRun:
    """One arm's live state inside the loop."""

    strategy: ArmStrategy
    model: nn.Module
    freezer: Freezer
    optimizer: torch.optim.Optimizer
    scheduler: Any
    tracker: Tracker
    theta0_hash: str
    step_fn: Any = None  # compiled step.LossOf (returns the loss tensor only), or None
    prefix: PrefixCache | None = None  # the frozen prefix's cache, when this arm has one
    prefix_note: str = ""  # "blocks 0-14 cached", or why there is no cache
    pending: list[StepRecord] = field(default_factory=list)  # read back at the next flush
    losses: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    # (step, held-out loss, training-text loss, probe loss or None)
    evals: list[tuple[int, float | None, float | None, float | None]] = field(
        default_factory=list)
    # Over every step of the run (not the last one's): allocated by the step, and reserved by
    # the process during it (CUDA-graph pools and the other arms' memory included).
    peak_mem_mb: float | None = None
    peak_reserved_mb: float | None = None
    stopped: str | None = None  # why this arm stopped early, if it did
    diverged: bool = False  # non-finite loss: no evaluation or sampling is possible
    best: tuple[int, float] | None = None  # (step, held-out loss) of the best evaluation
    best_state: dict[str, torch.Tensor] | None = None  # trained tensors at `best`
    bad_evals: int = 0
    replicas: Any = None  # sharding.Replicas: this arm's data-parallel group, or None

    def prefix_summary(self) -> dict[str, Any]:
        """What the frozen-prefix cache did, or why this arm has none."""
        return self.prefix.summary() if self.prefix else {"off": self.prefix_note}


    def note_memory(self, rec: StepRecord) -> None:
        """Fold one step's peaks into the run's."""
        if rec.mem_mb is not None:
            self.peak_mem_mb = max(self.peak_mem_mb or 0.0, rec.mem_mb)
        if rec.reserved_mb is not None:
            self.peak_reserved_mb = max(self.peak_reserved_mb or 0.0, rec.reserved_mb)

    @property
    def step_model(self) -> nn.Module:
        """What a training step runs: the model, or a cached arm's upper blocks."""
        return self.model if self.prefix is None else self.prefix.upper

    def summary(self, tokens_per_step: int, compiled: bool, p_before: dict | None,
                p_after: dict | None, p_best: dict | None, audit: dict | None
                ) -> dict[str, Any]:
        """This arm's figures for summary.json; p_after and the audit are None for a run
        interrupted before its end (and p_before too when it stopped during the first
        sampling)."""
        vals = [(s, v) for s, v, *_ in self.evals if v is not None]
        best = min(vals, key=lambda sv: sv[1]) if vals else (None, None)
        median = statistics.median(self.times) if self.times else None
        return {
            "kind": self.strategy.cfg.kind, "description": self.strategy.describe(),
            "status": f"stopped: {self.stopped}" if self.stopped else "finished",
            "trainable_params": self.strategy.ever_trainable(),
            "total_params": count_params(self.model), "theta0_hash": self.theta0_hash,
            "steps": len(self.losses), "total_time_s": sum(self.times),
            "median_step_time_s": median,
            # Steady state: compilation and warm-up land in the first step, reported apart.
            "tokens_per_s": tokens_per_step / median if median else None,
            "first_step_time_s": self.times[0] if self.times else None,
            "compiled": compiled, "prefix_cache": self.prefix_summary(),
            "mean_loss": _finite(statistics.fmean(self.losses)) if self.losses else None,
            "last_loss": _finite(self.losses[-1]) if self.losses else None,
            "val_loss_before": self.evals[0][1] if self.evals else None,
            "val_loss_best": best[1], "val_loss_best_step": best[0],
            "val_loss_after": self.evals[-1][1] if p_after is not None else None,
            "train_loss_after": self.evals[-1][2] if p_after is not None else None,
            "peak_mem_mb": self.peak_mem_mb, "peak_reserved_mb": self.peak_reserved_mb,
            "p_before": p_before, "p_after": p_after,
            "integrity": audit, "p_best": p_best,
            **self.probe_figures(best[0], p_after is not None),
            # ‖ΔW‖ keys of matrices this arm never trains: exact zeros, not a measured 0.
            "tracked_frozen": self.tracker.frozen_keys,
        }

    def probe_figures(self, best_step: int | None, ended: bool) -> dict[str, float | None]:
        """Probe loss before, at the best held-out point and after; learning and forgetting
        at both (pfreeze.measure.probe). None where the probe is off or not measured."""
        probe = {e[0]: (e[1], e[3] if len(e) > 3 else None) for e in self.evals}
        first = self.evals[0] if self.evals else (None, None, None, None)
        before = (first[1], first[3] if len(first) > 3 else None)
        at_best = probe.get(best_step, (None, None))
        after = probe.get(self.evals[-1][0], (None, None)) if ended and self.evals else (None,) * 2
        out: dict[str, float | None] = {"probe_loss_before": before[1],
                                        "probe_loss_best": at_best[1], "probe_loss_after": after[1]}
        for moment, (val, pr) in (("best", at_best), ("after", after)):
            lf = learning_forgetting((before[0], val), (before[1], pr))
            out[f"learning_{moment}"] = lf["learning"]
            out[f"forgetting_{moment}"] = lf["forgetting"]
        return out

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Host copies of what a resume needs beyond θ₀: the tensors this arm trains, the
        reference values of its partly frozen tensors, its best-point tensors."""
        tensors = {f"param.{n}": t for n, t in self.strategy.trained_tensors(self.model).items()}
        tensors.update({f"ref.{n}": part.ref.detach().cpu().clone()
                        for n, part in self.freezer.partial.items()})
        tensors.update({f"best.{n}": t for n, t in (self.best_state or {}).items()})
        return tensors

    def state(self) -> dict[str, Any]:
        """What a resume needs of this arm besides tensors and the optimizer (JSON)."""
        return {"name": self.strategy.name, "losses": self.losses, "times": self.times,
                "evals": self.evals, "peak_mem_mb": self.peak_mem_mb,
                "peak_reserved_mb": self.peak_reserved_mb,
                "scheduler": self.scheduler.state_dict(), "best": self.best,
                "bad_evals": self.bad_evals, "stopped": self.stopped, "diverged": self.diverged}

    @torch.no_grad()
    def restore(self, step: int, tensors: dict[str, torch.Tensor], optimizer: dict[str, Any],
                saved: dict[str, Any]) -> None:
        """Back to where the checkpoint at `step` left this arm (on top of a fresh θ₀)."""
        # A tensor the rebuilt arm leaves frozen may be θ₀'s copy that every arm shares
        # (pfreeze.run.shared): the checkpoint must not write into it.
        trained = self.strategy.trained_names()
        stray = sorted(k.partition(".")[2] for k in tensors
                       if k.startswith("param.") and k.partition(".")[2] not in trained)
        if stray:
            more = f" and {len(stray) - 1} more" if len(stray) > 1 else ""
            raise PfreezeError(
                f"the checkpoint of arm '{self.strategy.name}' trains {stray[0]}{more}, which "
                "the arm's plan now leaves frozen (a plan chosen from data came out "
                "differently on resume)",
                "resume on the machine, thread count and torch version that made the "
                "checkpoint, or start the run again")
        # Replay plan changes up to `step`, so the Freezer knows what was ever trainable.
        for s in sorted(self.strategy.plans):
            if 0 < s < step:
                self.freezer.apply(self.strategy.plans[s])
        for key, t in tensors.items():
            kind, _, name = key.partition(".")
            if kind == "param":
                self.freezer.params[name].copy_(t)
            elif kind == "ref" and name in self.freezer.partial:
                self.freezer.partial[name].ref.copy_(t)
            elif kind == "best":
                self.best_state = {**(self.best_state or {}), name: t}
        if "shards" not in optimizer:  # a sharded arm's come through its shards
            self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(saved["scheduler"])
        self.losses, self.times = saved["losses"], saved["times"]
        self.evals = [tuple(e) for e in saved["evals"]]
        self.peak_mem_mb = saved["peak_mem_mb"]
        self.peak_reserved_mb = saved.get("peak_reserved_mb")  # older checkpoints lack it
        self.best = tuple(saved["best"]) if saved["best"] else None  # type: ignore[assignment]
        self.bad_evals, self.stopped = saved["bad_evals"], saved["stopped"]
        self.diverged = saved["diverged"]
        # ‖ΔW_t‖ of the next step is measured from these weights.
        for prev, p in zip(self.tracker.prev, self.tracker.params, strict=True):
            prev.copy_(p)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN
