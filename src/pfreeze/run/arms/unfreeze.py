"""ULMFiT-style gradual unfreezing, top down: one more block every `every` steps."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pfreeze.errors import PfreezeError
from pfreeze.run.arms.base import register
from pfreeze.run.arms.schedule import Scheduled
from pfreeze.settings import ArmConfig


class UnfreezeArm(ArmConfig):
    """ULMFiT-style gradual unfreezing, top down."""

    kind: Literal["unfreeze"] = "unfreeze"
    every: int = Field(10, ge=1, description="steps between unfreezing one more block")
    start_layers: int = Field(1, ge=1)
    within: str = Field("", description="selector terms applied inside the blocks, e.g. roles=attn")



@register(UnfreezeArm)
class GradualUnfreeze(Scheduled):
    """ULMFiT-style: the top `start_layers` blocks train, one more block joins every `every`."""

    def phases(self, n_layers: int) -> list[tuple[int, str]]:
        c = self.cfg
        if c.start_layers > n_layers:
            raise PfreezeError(f"arm '{self.name}': start_layers={c.start_layers} but the model "
                               f"has {n_layers} blocks", f"use start_layers <= {n_layers}")
        within = f" {c.within}" if c.within else ""
        out, n, step = [], c.start_layers, 0
        while step < self.max_steps and n <= n_layers:
            out.append((step, f"layers=-{n}:{within}"))
            n, step = n + 1, step + c.every
        return out

    def describe(self) -> str:
        c = self.cfg
        return (f"gradual unfreezing: top {c.start_layers} block(s), one more every {c.every} "
                f"steps" + (f", `{c.within}` only" if c.within else ""))

