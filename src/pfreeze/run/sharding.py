"""Data parallel inside an arm: the arm's ranks each take a slice of the step's batch, and
torch's DistributedDataParallel averages their gradients, or FSDP2 (`fully_shard`, one
shard of every tensor per rank) when the arm does not fit one device.

Why the wrapper is rebuilt at each plan change: DDP registers the tensors that have
`requires_grad` when it is built and leaves frozen ones out of its gradient buckets (no
traffic for them, no `find_unused_parameters`). A tensor that starts training later would
never be all-reduced (the replicas drift apart silently) and one that stops would make the
next step fail; a new wrapper over the new trainable set has neither problem. The model under
the wrapper is the arm's own module: evaluation, sampling and the files never see DDP.

The batch semantics are gradient accumulation on one device: the stream draws
per_device_train_batch_size x gradient_accumulation_steps x replicas windows per step, each
replica takes its contiguous share, its micro-batches' gradients add up locally, and DDP
averages the shares. The loss recorded is the mean over the replicas.

FSDP2 keeps per-tensor `requires_grad` (frozen tensors are gathered for the forward but never
reduce-scattered, and a plan change needs no rebuild). The Freezer works on the shards:
masks are cut exactly as their tensors are (pfreeze.plan.masks.shard_like), and the audit
checks every rank's shard and adds them up (`ShardFreezer`). ‖ΔW‖ is measured on the shards
and summed over the ranks at the flush. For the after-measurements and the arm's files the
whole trained model is gathered once into a plain copy (`Replicas.gathered`).
"""

from __future__ import annotations

import contextlib
import copy
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pfreeze.errors import PfreezeError
from pfreeze.plan.masks import Freezer, local
from pfreeze.run.distributed import collective


def wants_fsdp(setting: bool | str, mode: str, fits: bool) -> bool:
    """training.fsdp: true, false, or auto (shard an arm whose memory plan does not fit one
    device); sharding needs several ranks per arm."""
    if setting is True and mode != "replicas":
        raise PfreezeError("training.fsdp=true shards an arm over its ranks, but this launch "
                           "gives each arm one rank",
                           "launch a multiple of the number of arms, larger than it (e.g. "
                           "torchrun --nproc-per-node 2 for one arm), or set training.fsdp=auto")
    return mode == "replicas" and (setting is True or (setting == "auto" and not fits))


def check_fsdp(t: Any) -> None:
    """What a sharded arm cannot do yet, refused with one line before anything loads."""
    for bad, what in ((t.keep_best, "training.keep_best"),
                      (t.prefix_cache is True, "training.prefix_cache=true")):
        if bad:
            raise PfreezeError(f"an arm sharded with FSDP2 (training.fsdp) does not support "
                               f"{what} yet", "turn it off, or set training.fsdp=false")


class Replicas:
    """One arm's data-parallel group as this rank sees it: its share of each batch and the
    DDP wrapper over the arm's current trainable set."""

    def __init__(self, group: Any, ranks: list[int], rank: int, sharded: bool = False) -> None:
        self.group, self.sharded = group, sharded
        self.index, self.size = ranks.index(rank), len(ranks)
        self.ddp: DistributedDataParallel | None = None
        self.module: nn.Module | None = None
        self.skeleton: nn.Module | None = None  # FSDP2: the arm's plain module, on meta
        self.synced = False  # DDP has broadcast rank 0's tensors once

    def shard(self, model: nn.Module) -> None:
        """FSDP2 over the arm's ranks: each decoder block, then the rest of the model."""
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        blocks = next((m for m in model.modules()
                       if isinstance(m, nn.ModuleList) and len(m) == n), None)
        if blocks is None:  # one unit would gather the whole model for every forward
            raise PfreezeError(f"FSDP2 found no list of {n} decoder blocks in "
                               f"{type(model).__name__}", "set training.fsdp=false")
        device = next(model.parameters()).device
        # A plain copy without its weights, filled once at the end (gathered).
        memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
                for p in model.parameters()}
        self.skeleton = copy.deepcopy(model, memo)
        mesh = DeviceMesh.from_group(self.group, device.type)
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)

    @torch.no_grad()
    def gathered(self, model: nn.Module) -> nn.Module:
        """The whole trained model, in plain tensors on every rank of the arm (collective)."""
        state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v
                 for k, v in collective(model.state_dict).items()}
        plain = self.skeleton
        plain.load_state_dict(state, assign=True)
        if hasattr(plain, "tie_weights"):
            plain.tie_weights()
        self.skeleton = None
        return plain

    def save_shards(self, model: nn.Module, optimizer: Any, path: Path) -> None:
        """Every rank of the arm writes its shards of the model and the optimizer state into
        `path` (torch.distributed.checkpoint; nothing is gathered). Frozen tensors are kept
        too: a tensor frozen now may have trained under an earlier plan."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        if self.index == 0:  # a folder left by a killed save goes first
            shutil.rmtree(path, ignore_errors=True)
        collective(lambda: dist.barrier(group=self.group))
        path.mkdir(parents=True, exist_ok=True)
        msd, osd = get_state_dict(model, optimizer)
        collective(lambda: dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path),
                                    process_group=self.group))

    def load_shards(self, model: nn.Module, optimizer: Any, path: Path) -> None:
        """The shards `save_shards` wrote, back into this rank's model and optimizer (DCP
        reads each rank's part, whatever the shards were cut like when it was saved)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if not path.is_dir():
            raise PfreezeError(f"the checkpoint lacks the shards of a sharded arm ({path})",
                               "start the run again with --overwrite")
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        collective(lambda: dcp.load(state, checkpoint_id=str(path), process_group=self.group))
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])

    def wrap(self, module: nn.Module) -> None:
        """(Re)build the wrapper over `module`'s tensors that train now (none: no wrapper).
        A sharded arm keeps its module: FSDP2 follows requires_grad by itself."""
        self.module, self.ddp = module, None
        if self.sharded or not any(p.requires_grad for p in module.parameters()):
            return
        device = next(module.parameters()).device
        # The replicas start equal (θ₀ hashed on every rank) and stay equal: rank 0's
        # tensors are broadcast at the first wrap only, not the whole model at every plan
        # change, and buffers (rotary frequencies) never change.
        self.ddp = collective(lambda: DistributedDataParallel(
            module, process_group=self.group, init_sync=not self.synced,
            broadcast_buffers=False,
            device_ids=[device.index if device.index is not None
                        else torch.cuda.current_device()] if device.type == "cuda" else None))
        self.synced = True

    @property
    def forward_module(self) -> nn.Module:
        """What the step calls: the wrapper, or the bare module when nothing trains."""
        return self.ddp if self.ddp is not None else self.module

    def part(self, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
        """This replica's contiguous share of each step tensor (None stays None)."""
        return [None if t is None else t.chunk(self.size)[self.index] for t in tensors]

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        """Micro-batches before the last keep their gradients local (one all-reduce a step)."""
        if self.sharded:
            self.module.set_requires_gradient_sync(last)
            yield
            return
        if self.ddp is None or last:
            yield
            return
        with self.ddp.no_sync():
            yield

    def settle(self, records: list[Any]) -> None:
        """The queued steps' figures over the whole arm (one all-reduce for the flush): the
        loss averaged over the replicas; ‖ΔW‖ of shards summed in squares."""
        if not records:
            return
        losses = torch.stack([r.loss.detach().float().reshape(()) for r in records])
        parts = [losses]
        # A sharded arm sums its shards' ‖ΔW‖ in squares; one that tracks nothing (LoRA) has
        # none to sum.
        tracked = self.sharded and records[0].dw.numel() > 0
        if tracked:
            parts += [torch.stack([r.dw for r in records]).float() ** 2,
                      torch.stack([r.dw0 for r in records]).float() ** 2]
        flat = torch.cat([p.reshape(-1) for p in parts])
        collective(lambda: dist.all_reduce(flat, group=self.group))
        n = len(records)
        mean = flat[:n] / self.size  # one division for the flush, not one per step
        for k, r in enumerate(records):
            r.loss = mean[k]
        if tracked:
            dw, dw0 = flat[n:].sqrt().split(flat[n:].numel() // 2)
            for k, r in enumerate(records):
                r.dw, r.dw0 = dw.view(n, -1)[k], dw0.view(n, -1)[k]


@dataclass
class ShardFreezer(Freezer):
    """A Freezer over one rank's shards whose audit covers the whole arm: every rank checks
    its shards bit for bit against θ₀, and the results are added up (collective)."""

    group: Any = None

    def audit(self) -> dict[str, object]:
        mine = super().audit()
        size = dist.get_world_size(self.group)
        parts: list[Any] = [None] * size
        collective(lambda: dist.all_gather_object(parts, mine, group=self.group))
        violations = sorted({v for p in parts for v in p["violations"]})
        return {"ok": not violations, "checked_elements": sum(p["checked_elements"]
                                                              for p in parts),
                "frozen_tensors": mine["frozen_tensors"], "violations": violations,
                "shards": size}


def check_tracker(tracker: Any, arm: str) -> None:
    """‖ΔW‖ of a fused matrix's pieces cut along its rows cannot be read from row shards."""
    if any(dim == 0 for _, _, dim, _ in tracker.parts):
        raise PfreezeError(f"arm '{arm}': its tracked matrices fuse several projections along "
                           "their rows, which FSDP2 shards; pfreeze cannot measure each "
                           "projection's ‖ΔW‖ on the shards",
                           "set training.fsdp=false, or set track to roles the family keeps in "
                           "matrices of their own (e.g. roles=o)")


class LocalView:
    """A sharded model as the ‖ΔW‖ tracker reads it: each tensor's local shard."""

    def __init__(self, model: nn.Module) -> None:
        self.config = model.config
        self._model = model

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, p in self._model.named_parameters():
            yield name, local(p.detach())
