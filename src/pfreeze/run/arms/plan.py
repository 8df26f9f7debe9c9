"""Precision freezing: one freeze plan, written in the selector language, for the whole run."""

from __future__ import annotations

from typing import Literal

from torch import nn

from pfreeze.plan.selectors import Plan, compile_plan
from pfreeze.run.arms.base import ArmStrategy, register
from pfreeze.settings import ArmConfig


class PlanArm(ArmConfig):
    """An arm that trains what its selector picks (`select`), nothing else."""

    kind: Literal["plan"] = "plan"
    # Selector language (see plan.py); default: q, k, v of the upper half of the blocks.
    select: str = "layers=50%: roles=q,k,v"



@register(PlanArm)
class Planned(ArmStrategy):
    def _plans(self, model: nn.Module) -> dict[int, Plan | None]:
        return {0: compile_plan(model, self.family, self.cfg.select)}

    def describe(self) -> str:
        return f"precision-frozen: only `{self.cfg.select}` trains"

