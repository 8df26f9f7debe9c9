"""The memory plan of a run: per arm, the bytes of its weights, gradients, optimizer state and
activations, from the model's shapes alone (a model on the meta device: no weights), against
the device's free memory. `pfreeze plan --config` prints it; a run computes it before it
loads anything and stops there if its arms cannot fit together.

    weights      every tensor once (tied weights once): frozen ones in the storage dtype
                 (model.dtype), trained ones in the master dtype (fp32 with
                 training.master_weights=fp32, else the storage dtype); plus buffers
    gradients    every tensor the arm ever trains, whole, in the master dtype
    optimizer    per element of those tensors: AdamW 2 slots, SGD with momentum 1 (0 without),
                 in the master dtype (masks.optimizer_state_bytes)
    activations  tokens = per_device_train_batch_size × block_size, b = 2 under bf16 autocast
                 else 4, h = hidden size, I = MLP width, V = vocabulary. Per block from the
                 lowest trained one up (blocks below keep nothing: no input requires grad),
                 per token, (10·h + 3·I)·b: the block's input, norm outputs, q, k, v, attention
                 output, MLP input, gate/up and activation (SDPA keeps no attention scores).
                 With gradient checkpointing, h·b per checkpointed block (its input) plus one
                 block's full activations (the recompute). Plus the logits and their gradient,
                 tokens × V × (b + 8). An estimate, not a measurement: within tens of percent.

Gradients and activations live for one step of one arm (arms step one after the other and
gradients are freed after each step). A tensor an arm never trains is θ₀'s, held once for
all arms (pfreeze.run.shared). So arms together need those shared frozen tensors + Σ(own
weights + optimizer) + the largest (gradients + activations); on the CPU, θ₀ itself is held
too while the arms are made.
Placed one after the other (arms_placement: sequential), the largest arm's total is what
counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pfreeze.plan.masks import optimizer_state_bytes
from pfreeze.plan.selectors import Plan


@dataclass(frozen=True)
class Shape:
    """What the activation estimate reads of the model's config."""

    layers: int
    hidden: int
    mlp: int
    vocab: int

    @classmethod
    def of(cls, config: Any) -> Shape:
        h = config.hidden_size
        mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
        return cls(config.num_hidden_layers, h, mlp or 4 * h, config.vocab_size)


@dataclass(frozen=True)
class ArmMemory:
    name: str
    weights: int
    grads: int
    optimizer: int
    activations: int
    note: str = ""  # e.g. an upper bound: what trains is chosen from data at run time
    # θ₀'s tensors it never trains, by name: their bytes (part of `weights`), shareable
    frozen: dict[str, int] = field(default_factory=dict)

    @property
    def own(self) -> int:
        """What it holds that no other arm can share: weights it trains, optimizer state."""
        return self.resident - sum(self.frozen.values())

    @property
    def resident(self) -> int:
        """What the arm holds for the whole run."""
        return self.weights + self.optimizer

    @property
    def step(self) -> int:
        """What one of its steps adds, freed afterwards."""
        return self.grads + self.activations

    @property
    def total(self) -> int:
        return self.resident + self.step


@dataclass(frozen=True)
class MemoryPlan:
    arms: list[ArmMemory]
    base: int  # θ₀ held beside the arms (CPU device), else 0
    free: int | None  # the device's free memory, None where unknown
    device: str

    @property
    def shared(self) -> int:
        """θ₀'s tensors that some arm never trains: on the device once for all arms."""
        union = {n: b for a in self.arms for n, b in a.frozen.items()}
        return sum(union.values())

    @property
    def together(self) -> int:
        """Bytes the arms need resident together, at the peak of the largest step."""
        return (self.base + self.shared + sum(a.own for a in self.arms)
                + max((a.step for a in self.arms), default=0))

    @property
    def alone(self) -> int:
        """Bytes the largest arm needs on its own (arms placed one after the other)."""
        return self.base + max((a.total for a in self.arms), default=0)

    @property
    def fits(self) -> bool:
        return self.free is None or self.together <= self.free

    @property
    def fits_alone(self) -> bool:
        return self.free is None or self.alone <= self.free

    def misses(self) -> list[str]:
        """A line per arm too large for the device on its own: by how much it misses, and
        over how many devices its weights, gradients and optimizer state would have to be
        sharded (FSDP divides those; each device still holds its own activations)."""
        if self.free is None:
            return []
        out = []
        for a in self.arms:
            if (over := self.base + a.total - self.free) <= 0:
                continue
            room = self.free - self.base - a.activations
            shards = "" if room <= 0 else (
                f"; sharded (FSDP) over {math.ceil((a.total - a.activations) / room)} or more "
                "such devices it fits")
            out.append(f"arm '{a.name}' needs {mib(a.total):,.0f} MiB: "
                       f"{mib(over):,.0f} MiB more than {self.device} has free{shards}"
                       + ("" if room > 0 else "; its activations alone exceed the device: "
                          "lower the batch or set training.gradient_checkpointing=true"))
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One row per arm, in MiB (for a table and summary.json)."""
        return [{"arm": a.name, "weights_mib": mib(a.weights), "grads_mib": mib(a.grads),
                 "optimizer_mib": mib(a.optimizer), "activations_mib": mib(a.activations),
                 "total_mib": mib(a.total), "note": a.note} for a in self.arms]

    def summary(self) -> dict[str, Any]:
        return {"arms": self.rows(), "together_mib": mib(self.together),
                "frozen_shared_mib": mib(self.shared),
                "one_at_a_time_mib": mib(self.alone),
                "free_mib": None if self.free is None else mib(self.free), "device": self.device}

    def headline(self) -> str:
        free = "unknown" if self.free is None else f"{mib(self.free):,.0f} MiB"
        return (f"arms together: {mib(self.together):,.0f} MiB (of it "
                f"{mib(self.shared):,.0f} MiB of frozen tensors, held once for all arms), "
                "one at a time "
                f"(arms_placement: sequential): {mib(self.alone):,.0f} MiB, of {free} free on "
                f"{self.device}")


def mib(n: int) -> float:
    return round(n / 2**20, 1)


def activation_bytes(shape: Shape, tokens: int, lowest: int | None, bf16: bool,
                     checkpointing: bool) -> int:
    """The activation estimate of one step (the module docstring has the formula)."""
    if lowest is None:
        return 0
    b = 2 if bf16 else 4
    block = tokens * (10 * shape.hidden + 3 * shape.mlp) * b
    n = shape.layers - lowest
    kept = n * tokens * shape.hidden * b + block if checkpointing else n * block
    return kept + tokens * shape.vocab * (b + 8)


def arm_memory(name: str, model: nn.Module, plans: list[Plan | None], storage: torch.dtype,
               master: torch.dtype, optim: str, momentum: float, activations: int,
               note: str = "") -> ArmMemory:
    """One arm's bytes: `plans` are every plan it runs (their union trains)."""
    sizes = {n: tp.total for p in plans if p is not None for n, tp in p.tensors.items()}
    params = dict(model.named_parameters())  # tied weights once
    store, keep = storage.itemsize, master.itemsize
    frozen = {n: p.numel() * store for n, p in params.items() if n not in sizes}
    weights = sum(frozen.values()) + sum(p.numel() * keep for n, p in params.items()
                                         if n in sizes)
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    return ArmMemory(name, weights, keep * sum(sizes.values()),
                     optimizer_state_bytes(plans, optim, momentum, bytes_per_element=keep),
                     activations, note, frozen)


def free_bytes(device: torch.device) -> int | None:
    """Free memory on `device`: the CUDA allocator's view of the GPU, or available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None
