"""What the loop does across the ranks of a distributed run (pfreeze.run.distributed): the
collective tests of the session, the gathers to rank 0 of checkpoints and summaries, sharded
arms' checkpoints through torch.distributed.checkpoint, and the placement record. `Loop`
inherits these; in a single process each is the plain local answer, with no collective.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pfreeze.outputs.checkpoint import ArmCheckpoint
from pfreeze.plan.masks import local
from pfreeze.run import distributed

SHARDS = ".checkpoint.shards"  # sharded arms' checkpoints, written before the swap-in


class AcrossRanks:
    """The loop's side of a distributed run (mixed into pfreeze.run.loop.Loop, whose
    attributes it reads: world, dist, mine, arms, files, cfg, device, sharded)."""

    world: distributed.World
    dist: distributed.Placement
    mine: list[int]
    arms: list[Any]
    files: Any
    cfg: Any
    device: torch.device
    sharded: bool

    def unshard(self) -> None:
        """Sharded arms gathered whole for the after-measurements and files (collective); the
        freezer keeps the shards, and the audit runs on them."""
        for arm in self.arms:
            if arm.replicas is not None and arm.replicas.sharded:
                arm.model = arm.replicas.gathered(arm.model)

    def all_stopped(self) -> bool:
        """Whether every arm has stopped, on every rank (all ranks leave the loop together):
        as the last flush or evaluation told every rank (arms stop only there)."""
        if not self.world.distributed:
            return all(a.stopped for a in self.arms)
        return self.files.all_stopped

    def share_signals(self, signals: Any, on: bool = True) -> None:
        """While the ranks train, a signal counts once every rank has heard of it (at the
        next metrics flush), so that all stop at one step (pfreeze.run.interrupts)."""
        if not self.world.distributed:
            return
        self.files.signal = (lambda: signals.pending) if on else (lambda: None)
        signals.shared = (lambda: self.files.signal_seen) if on else None

    def any_pending(self) -> bool:
        """Whether some arm on some rank has steps not yet flushed."""
        return distributed.any_rank(self.world, any(a.pending for a in self.arms))

    def gather_arms(self, items: list[Any]) -> list[Any] | None:
        """One item per arm of this rank -> every arm's item on rank 0, in the config's order
        (None on the other ranks); samples held on other ranks travel first."""
        if not self.world.distributed:
            return items
        self.files.sync()
        mine = list(zip(self.mine, items, strict=True)) if self.dist.reports else []
        got = distributed.gather(self.world, mine)
        if got is None:
            return None
        return [item for _, item in sorted((p for part in got for p in part),
                                           key=lambda p: p[0])]

    def checkpoint_parts(self) -> tuple[list[Any], dict[str, Path]] | None:
        """Every arm's (ArmCheckpoint, state) on rank 0, in the config's order, and the shard
        folders to move into the checkpoint (None on the other ranks). A sharded arm's ranks
        write its shards first (torch.distributed.checkpoint); its ArmCheckpoint names them."""
        parts = []
        for i, arm in zip(self.mine, self.arms, strict=True):
            if arm.replicas is not None and arm.replicas.sharded:
                name = f"arm{i}.dcp"
                arm.replicas.save_shards(arm.model, arm.optimizer,
                                         self.files.root / SHARDS / name)
                ckpt = ArmCheckpoint({}, {"shards": name}, arm.diverged)
            else:
                state = arm.optimizer.state_dict()
                if self.world.distributed:  # sent to rank 0 as host tensors
                    state = {**state, "state": {k: {n: v.cpu() if isinstance(v, torch.Tensor)
                                                    else v for n, v in slots.items()}
                                                for k, slots in state["state"].items()}}
                ckpt = ArmCheckpoint(arm.checkpoint_tensors(), state, arm.diverged)
            parts.append((ckpt, arm.state()))
        got = self.gather_arms(parts)
        if got is None:
            return None
        names = [c.optimizer["shards"] for c, _ in got if "shards" in c.optimizer]
        return got, {n: self.files.root / SHARDS / n for n in names}

    def restore_arms(self, state: dict[str, Any], arms: list[tuple[dict, dict]],
                     folder: Path | None) -> None:
        """This rank's arms back to the checkpoint in `folder` (state.json's `state`, every
        arm's tensors and optimizer state as checkpoint.load gives them); a sharded arm from
        its shards. A checkpoint with other ranks per arm is refused."""
        self.dist.check_resume(state.get("replicas", 1))
        mine, saved = [arms[i] for i in self.mine], [state["arms"][i] for i in self.mine]
        for arm, (tensors, optimizer), own in zip(self.arms, mine, saved, strict=True):
            arm.restore(state["step"], tensors, optimizer, own)
            if arm.replicas is not None:  # DDP registers the trainable set of the plan now
                arm.replicas.wrap(arm.step_model)
        self._load_shards(folder, [opt for _, opt in mine])

    def _load_shards(self, folder: Path | None, optimizers: list[dict[str, Any]]) -> None:
        """Sharded arms back from their shards in checkpoint `folder` (after ArmRun.restore):
        weights, optimizer state, the frozen elements' references and ‖ΔW‖'s last weights."""
        for arm, opt in zip(self.arms, optimizers, strict=True):
            if "shards" not in opt or arm.replicas is None or folder is None:
                continue
            arm.replicas.load_shards(arm.model, arm.optimizer, folder / opt["shards"])
            with torch.no_grad():
                # Restored every step, the frozen elements are their references.
                for part in arm.freezer.partial.values():
                    part.ref = local(part.param.detach())[part.frozen].clone()
                for prev, p in zip(arm.tracker.prev, arm.tracker.params, strict=True):
                    prev.copy_(p)

    def gather_summaries(self, arms: dict[str, Any], missing: list[dict[str, str]]
                         ) -> tuple[dict[str, Any], list[dict[str, str]]] | None:
        """Every rank's arm summaries and missing files on rank 0, the arms in the config's
        order (None on the other ranks)."""
        if not self.world.distributed:
            return arms, missing
        self.files.sync()
        got = distributed.gather(self.world, (arms, missing) if self.dist.reports else ({}, []))
        if got is None:
            return None
        merged = {n: a for s, _ in got for n, a in s.items()}
        return ({str(c.name): merged[str(c.name)] for c in self.cfg.arms if c.name in merged},
                [m for _, ms in got for m in ms])

    def distribution(self) -> dict[str, Any]:
        """summary.json's placement record: world size, mode, each arm's ranks and devices."""
        return {**self.dist.describe([str(a.name) for a in self.cfg.arms],
                                     distributed.device_name(self.world, self.device)),
                "fsdp": self.sharded}
