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


class SharedTheta0:
    """Device copies of θ₀'s parameters, made the first time an arm leaves one frozen."""

    def __init__(self, base: nn.Module, device: torch.device) -> None:
        self.base = dict(base.named_parameters())  # θ₀ by name (tied weights once)
        self.device = device
        self.tensors: dict[str, torch.Tensor] = {}

    def alias(self, model: nn.Module, origin: dict[int, str], trained: set[str],
              check: bool = True) -> None:
        """Point every parameter of `model` that copies a θ₀ parameter (`origin`: by id, as
        ArmStrategy.copy_theta0 records it) and is not in `trained` at the shared device copy
        of that θ₀ parameter. `check`: alias only a copy still equal to θ₀ (an arm may edit a
        tensor it then keeps frozen); False where the arm's hash already proves the whole
        copy equal."""
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
                # copy=True: on the CPU too, so the arms never alias the host θ₀ itself (an
                # export writes trained tensors into it).
                t = self.tensors[src] = base.detach().to(self.device, copy=True)
            p.data = t
