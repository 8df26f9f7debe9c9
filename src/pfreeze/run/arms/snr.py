"""Spectrum-style selection: the top share of each matrix type by a data-free SNR score trains."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from pfreeze.plan.selectors import Plan, compile_plan
from pfreeze.run.arms.base import ArmStrategy, register
from pfreeze.settings import ArmConfig


class SnrArm(ArmConfig):
    """Spectrum-style: the top share of each matrix type by SNR score trains."""

    kind: Literal["snr"] = "snr"
    top_percent: float = Field(25.0, gt=0, le=100)
    roles: str = "q,k,v,o"



@register(SnrArm)
class SnrSelected(ArmStrategy):
    """Spectrum-style: the top `top_percent` % of each matrix type by SNR score trains."""

    def _plans(self, model: nn.Module) -> dict[int, Plan | None]:
        from pfreeze.plan.rank import snr_scores, top_selector

        roles = set(self.cfg.roles.split(","))
        self.selector = top_selector(snr_scores(model, self.family, roles), self.cfg.top_percent)
        return {0: compile_plan(model, self.family, self.selector)}

    def describe(self) -> str:
        return f"SNR-selected: top {self.cfg.top_percent:g}% of each of {self.cfg.roles} by score"

