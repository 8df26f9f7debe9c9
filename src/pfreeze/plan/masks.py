"""Enforcing a plan: frozen elements stay bit-identical, whatever the optimizer does.

A zero gradient is not enough: AdamW's decoupled weight decay and stale momentum still move
masked elements. So a partially trainable tensor gets two treatments:
  1. its gradient is multiplied by the mask before clipping and the step (clipping and the
     optimizer's moments then only see trainable elements), and
  2. after every optimizer step its frozen elements are copied back from a reference.
Wholly frozen tensors never get `requires_grad` and never enter the optimizer's state.
The audit then checks every frozen element against θ₀ by hash (whole tensors) or by value
(partial tensors), and names the first tensor that moved.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from pfreeze.errors import PfreezeError
from pfreeze.models.load import tensor_bytes
from pfreeze.plan.selectors import Plan


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (a DTensor under FSDP2), sharing its storage; a
    plain tensor as it is. Masks, references and the audit work on shards."""
    return t.to_local() if hasattr(t, "to_local") else t


def shard_like(mask: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`mask` (the whole tensor's) cut exactly as `p` is sharded: this rank's part of it."""
    if not hasattr(p, "device_mesh"):
        return mask.to(p.device)
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: every rank cuts its own part of the same mask, no communication.
    return distribute_tensor(mask.to(local(p).device), p.device_mesh, p.placements,
                             src_data_rank=None).to_local()


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(tensor_bytes(local(t))).hexdigest()


def digests(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """tensor_digest of each tensor, on several threads: hashlib lets go of the GIL while it
    hashes, so an 8B model's 16 GB takes seconds where one thread takes most of a minute."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(tensors, pool.map(tensor_digest, tensors.values()), strict=True))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality: unlike ==, it tells 0.0 from -0.0 and matches NaN payloads."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                              b.contiguous().view(torch.uint8))


@dataclass
class _Partial:
    param: nn.Parameter
    frozen: torch.Tensor  # bool, on the parameter's device: True where the plan freezes
    ref: torch.Tensor  # 1-D: the values of the frozen elements, in row-major order


@dataclass
class Freezer:
    """Holds the current plan of one arm's model and enforces it around optimizer steps."""

    model: nn.Module
    # θ₀ digests already known (tensors shared with other arms, hashed once on the host)
    known: dict[str, str] = field(default_factory=dict)
    params: dict[str, nn.Parameter] = field(init=False)
    partial: dict[str, _Partial] = field(init=False, default_factory=dict)
    # Which elements were ever trainable: the audit checks only the rest against θ₀.
    ever: dict[str, torch.Tensor | None] = field(init=False, default_factory=dict)
    theta0_digest: dict[str, str] = field(init=False, default_factory=dict)
    theta0_partial: dict[str, torch.Tensor] = field(init=False, default_factory=dict)
    moved_early: set[str] = field(init=False, default_factory=set)  # moved while frozen
    applied: bool = field(init=False, default=False)  # has any plan been in force yet

    def __post_init__(self) -> None:
        self.params = dict(self.model.named_parameters())
        self.theta0_digest = {**digests({n: p for n, p in self.params.items()
                                         if n not in self.known}), **self.known}
        for p in self.params.values():
            p.requires_grad_(False)  # nothing trains until a plan says so

    def apply(self, plan: Plan | None) -> None:
        """Make `plan` the one in force (None: everything frozen). Safe to call mid-run.

        The optimizer must already hold every tensor any plan trains (see train.Loop.setup):
        a tensor frozen now has no gradient, and optimizers skip those, state and decay alike.
        """
        tensors = plan.tensors if plan is not None else {}
        self.partial.clear()
        for name, p in self.params.items():
            tp = tensors.get(name)
            p.requires_grad_(tp is not None)
            if tp is None:
                p.grad = None  # a stale gradient must not reach the optimizer
                continue
            prev = self.ever.get(name, False)
            # First time trainable after some training: it must not have moved while frozen
            # (the audit can no longer see that once its elements may move).
            if prev is False and self.applied and tensor_digest(p) != self.theta0_digest[name]:
                self.moved_early.add(name)
            if tp.mask is None:
                self.ever[name] = None
                self.theta0_partial.pop(name, None)  # every element may move now
                continue
            mask = shard_like(tp.mask, p)
            frozen = ~mask
            # Reference = current values: elements trained under an earlier plan keep theirs.
            self.partial[name] = _Partial(p, frozen, local(p.detach())[frozen])  # a copy
            if prev is False:  # θ₀ values, to audit a tensor that is only partly trainable
                self.theta0_partial[name] = local(p.detach()).clone()
            self.ever[name] = None if prev is None else mask if prev is False else prev | mask
        self.applied = True

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.params.values() if p.requires_grad]

    @torch.no_grad()
    def mask_grads(self) -> None:
        # masked_fill, not a multiply: 0 * inf or 0 * NaN would be NaN and poison clipping.
        for part in self.partial.values():
            if part.param.grad is not None:
                local(part.param.grad).masked_fill_(part.frozen, 0.0)

    @torch.no_grad()
    def restore(self) -> None:
        """Undo what weight decay and momentum did to frozen elements in the last step."""
        for part in self.partial.values():
            local(part.param).masked_scatter_(part.frozen, part.ref)

    @torch.no_grad()
    def audit(self) -> dict[str, object]:
        """Check every never-trainable element against θ₀, bit for bit."""
        checked, tensors, violations = 0, 0, []
        now = digests({n: p for n, p in self.params.items() if self.ever.get(n, False) is False})
        for name, p in self.params.items():
            ever = self.ever.get(name, False)
            if ever is None:  # trains whole now: only a move while it was frozen counts
                if name in self.moved_early:
                    violations.append(name)
                continue
            tensors += 1
            if ever is False:
                checked += local(p).numel()
                if now[name] != self.theta0_digest[name]:
                    violations.append(name)
                continue
            frozen = ~ever
            checked += int(frozen.sum())
            if name in self.moved_early or not _same_bits(local(p.detach())[frozen],
                                                          self.theta0_partial[name][frozen]):
                violations.append(name)
        return {"ok": not violations, "checked_elements": checked, "frozen_tensors": tensors,
                "violations": violations}


def check_audit(arm: str, result: dict[str, object]) -> None:
    if not result["ok"]:
        names: list[str] = result["violations"]  # type: ignore[assignment]
        raise PfreezeError(
            f"integrity violation in arm '{arm}': frozen elements of {names[0]} "
            f"changed ({len(names)} tensor(s) in all)",
            "this is a pfreeze bug; please report it with the run's config",
        )


@torch.no_grad()
def promote(model: nn.Module, names: Iterable[str], dtype: torch.dtype = torch.float32) -> int:
    """Give the named parameters fp32 master values (in place, before any Freezer or optimizer
    sees them): gradients and optimizer state then follow in fp32, while every other tensor
    keeps its storage dtype. Exact: bf16 values are fp32 values, so a partly trainable tensor's
    frozen elements keep their bits. Tied weights are one Parameter: promoted once. Returns
    the number of tensors promoted."""
    params = dict(model.named_parameters())
    n = 0
    for name in names:
        p = params.get(name)
        if p is not None and p.dtype != dtype and p.is_floating_point():
            p.data = p.data.to(dtype)
            n += 1
    return n


# Per-element state slots: AdamW keeps exp_avg and exp_avg_sq, SGD one momentum buffer.
STATE_SLOTS = {"adamw": 2, "adamw_fused": 2, "sgd": 1}


def optimizer_state_bytes(plans: Plan | Iterable[Plan | None], optim: str = "adamw",
                          momentum: float = 0.9, bytes_per_element: int = 4) -> int:
    """Optimizer-state bytes for every tensor the plans ever train (fp32 state by default).

    Optimizers keep state for whole tensors, so a tensor with one trainable element costs as
    much as a fully trainable one; wholly frozen tensors cost nothing. AdamW's scalar step
    counts are left out.
    """
    if optim not in STATE_SLOTS:
        raise PfreezeError(f"unknown optimizer '{optim}'", f"use one of {', '.join(STATE_SLOTS)}")
    slots = 0 if optim == "sgd" and not momentum else STATE_SLOTS[optim]
    sized: dict[str, int] = {}
    for plan in [plans] if isinstance(plans, Plan) else plans:
        for name, tp in (plan.tensors.items() if plan is not None else ()):
            sized[name] = tp.total
    return slots * bytes_per_element * sum(sized.values())



