"""θ₀'s frozen tensors held once on the device for every arm of a process.

Every arm starts from θ₀, and a tensor an arm never trains stays bit-identical to θ₀ for the
whole run (the Freezer audits it). So it needs no copy per arm: each arm keeps its own
`nn.Parameter` (its own requires_grad and .grad) over one device storage that all arms share,
and only the tensors an arm trains at some step are the arm's own. Two arms of an 8B model in
bf16 then hold 16 GB of frozen weights once, not twice (docs/BENCHMARKS.md).

Only where nothing writes a frozen parameter in place: not under data parallelism (DDP
broadcasts rank 0's tensors into the parameters, FSDP2 replaces them by shards), and not for
arms placed one after the other (one arm on the device at a time: nothing to share).
"""

from __future__ import annotations

import torch
from torch import nn

from pfreeze.plan.masks import digests


class SharedTheta0:
    """Device copies of θ₀'s parameters, made the first time an arm leaves one frozen."""

    def __init__(self, base: nn.Module, device: torch.device) -> None:
        self.base = dict(base.named_parameters())  # θ₀ by name (tied weights once)
        self.device = device
        self.tensors: dict[str, torch.Tensor] = {}
        self.digests: dict[str, str] = {}  # of θ₀'s tensors, hashed on the host once

    @property
    def mib(self) -> float:
        return sum(t.numel() * t.element_size() for t in self.tensors.values()) / 2**20

    def alias(self, model: nn.Module, origin: dict[int, str], trained: set[str],
              check: bool = True) -> dict[str, str]:
        """Point every parameter of `model` that copies a θ₀ parameter (`origin`: by id, as
        ArmStrategy.copy_theta0 records it) and is not in `trained` at the shared device copy
        of that θ₀ parameter. `check`: alias only a copy still equal to θ₀ (an arm may edit a
        tensor it then keeps frozen); False where the arm's hash already proves the whole
        copy equal. Returns the θ₀ digest of each parameter it aliased, by the arm's name: its
        Freezer need not copy the shared tensors back to the host to hash them again."""
        aliased: dict[str, str] = {}
        for name, p in model.named_parameters():
            src = origin.get(id(p))
            if src is None or name in trained:
                continue
            base = self.base[src]
            if base.shape != p.shape or base.dtype != p.dtype or (
                    check and not torch.equal(base.detach(), p.detach())):
                continue  # the arm's own version of this tensor
            t = self.tensors.get(src)
            if t is None:
                # copy=True: on the CPU too, so no arm ever aliases the host θ₀ itself; it is
                # dropped once the arms are built, so this costs θ₀ twice only meanwhile.
                t = self.tensors[src] = base.detach().to(self.device, copy=True)
            p.data = t
            aliased[name] = src
        self.digests.update(digests({s: self.base[s] for s in set(aliased.values())
                                     if s not in self.digests}))
        return {n: self.digests[s] for n, s in aliased.items()}
