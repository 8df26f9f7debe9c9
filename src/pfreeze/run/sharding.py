"""Data parallel inside an arm: the arm's ranks each take a slice of the step's batch, and
torch's DistributedDataParallel averages their gradients.

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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pfreeze.run.distributed import collective


class Replicas:
    """One arm's data-parallel group as this rank sees it: its share of each batch and the
    DDP wrapper over the arm's current trainable set."""

    def __init__(self, group: Any, ranks: list[int], rank: int) -> None:
        self.group, self.ranks = group, ranks
        self.index, self.size = ranks.index(rank), len(ranks)
        self.ddp: DistributedDataParallel | None = None
        self.module: nn.Module | None = None

    def wrap(self, module: nn.Module) -> None:
        """(Re)build the wrapper over `module`'s tensors that train now (none: no wrapper)."""
        self.module, self.ddp = module, None
        if not any(p.requires_grad for p in module.parameters()):
            return
        device = next(module.parameters()).device
        self.ddp = collective(lambda: DistributedDataParallel(
            module, process_group=self.group,
            device_ids=[device] if device.type == "cuda" else None))

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
        if self.ddp is None or last:
            yield
            return
        with self.ddp.no_sync():
            yield

    def mean_losses(self, losses: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each step's loss averaged over the replicas (one all-reduce for the flush)."""
        if not losses:
            return losses
        stacked = torch.stack([loss.detach().float() for loss in losses])
        collective(lambda: dist.all_reduce(stacked, group=self.group))
        return list(stacked / self.size)
