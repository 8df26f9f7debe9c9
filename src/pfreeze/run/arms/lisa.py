"""LISA-style layerwise sampling: `gamma` random blocks train, resampled every `interval` steps."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from pfreeze.errors import PfreezeError
from pfreeze.run.arms.base import register
from pfreeze.run.arms.schedule import Scheduled
from pfreeze.settings import ArmConfig


class LisaArm(ArmConfig):
    """LISA-style layerwise sampling: gamma random blocks train, resampled every interval."""

    kind: Literal["lisa"] = "lisa"
    gamma: int = Field(2, ge=1)
    interval: int = Field(20, ge=1)
    seed: int = 0
    within: str = ""
    always: str | None = Field(None, description="selector trained in every phase, e.g. roles=norm")



@register(LisaArm)
class Lisa(Scheduled):
    """LISA-style: `gamma` random blocks train, resampled every `interval` steps (seeded)."""

    def phases(self, n_layers: int) -> list[tuple[int, str]]:
        c = self.cfg
        if c.gamma > n_layers:
            raise PfreezeError(f"LISA arm '{self.name}': gamma={c.gamma} but the model has "
                               f"{n_layers} blocks", f"use gamma <= {n_layers}")
        gen = torch.Generator().manual_seed(c.seed)
        out = []
        for start in range(0, self.max_steps, c.interval):
            blocks = sorted(torch.randperm(n_layers, generator=gen)[: c.gamma].tolist())
            select = f"layers={','.join(map(str, blocks))}" + (f" {c.within}" if c.within else "")
            out.append((start, select + (f"; {c.always}" if c.always else "")))
        return out

    def describe(self) -> str:
        c = self.cfg
        return (f"LISA: {c.gamma} random block(s) every {c.interval} steps (seed {c.seed})"
                + (f", always `{c.always}`" if c.always else ""))

