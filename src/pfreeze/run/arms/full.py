"""Full fine-tuning: every parameter trains (the reference the other arms are measured against)."""

from __future__ import annotations

from typing import Literal

from torch import nn

from pfreeze.plan.selectors import Plan, full_plan
from pfreeze.run.arms.base import ArmStrategy, register
from pfreeze.settings import ArmConfig


class FullArm(ArmConfig):
    """An arm that trains every parameter (full fine-tuning, the reference)."""

    kind: Literal["full"] = "full"



@register(FullArm)
class Full(ArmStrategy):
    def _plans(self, model: nn.Module) -> dict[int, Plan | None]:
        return {0: full_plan(model, self.family)}

    def describe(self) -> str:
        return "full fine-tuning: every parameter trains"

