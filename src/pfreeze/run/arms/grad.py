"""Data-driven selection: the top share of each matrix type by mean gradient norm on a few
calibration batches (drawn with their own seed: the shared batch stream is untouched)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from pfreeze.errors import PfreezeError
from pfreeze.plan.selectors import Plan, compile_plan
from pfreeze.run.arms.base import ArmStrategy, register
from pfreeze.settings import ArmConfig


class GradArm(ArmConfig):
    """Data-driven selection: the top share of each matrix type by mean gradient norm."""

    kind: Literal["grad"] = "grad"
    top_percent: float = Field(25.0, gt=0, le=100)
    roles: str = "q,k,v,o"
    batches: int = Field(4, ge=1, description="calibration batches from the training text")



@register(GradArm)
class GradSelected(ArmStrategy):
    """The top `top_percent` % of each matrix type by mean gradient norm on calibration data.

    The loop hands the arm a `calibration` source that draws batches with their own seed from
    the training text, so selecting never consumes the shared batch stream.
    """

    plans_before_training = False

    def _plans(self, model: nn.Module) -> dict[int, Plan | None]:
        from pfreeze.plan.rank import grad_scores, top_selector

        if not self.calibration:
            raise PfreezeError(f"arm '{self.name}' needs calibration batches",
                               "run it through pfreeze run (the loop provides them)")
        roles = set(self.cfg.roles.split(","))
        scores = grad_scores(model, self.family, self.calibration(self.cfg.batches), roles)
        self.selector = top_selector(scores, self.cfg.top_percent)
        return {0: compile_plan(model, self.family, self.selector)}

    def describe(self) -> str:
        return (f"gradient-selected: top {self.cfg.top_percent:g}% of each of {self.cfg.roles} "
                f"by mean gradient norm over {self.cfg.batches} batches")

