"""Scheduled freezing: phases, each a freeze plan that replaces the previous one from its start step
(t < t0 frozen, t >= t0 trains)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from pfreeze.errors import PfreezeError
from pfreeze.plan.selectors import Plan, compile_plan
from pfreeze.run.arms.base import ArmStrategy, register
from pfreeze.settings import ArmConfig, Strict


class PhaseConfig(Strict):
    start: int = Field(ge=0, description="first step (0-based) at which this plan trains")
    select: str


class ScheduleArm(ArmConfig):
    kind: Literal["schedule"] = "schedule"
    phases: list[PhaseConfig] = Field(min_length=1)



@register(ScheduleArm)
class Scheduled(ArmStrategy):
    """Phases: from `start` on, the phase's plan is in force (t < t₀ frozen, t ≥ t₀ trains)."""

    def phases(self, n_layers: int) -> list[tuple[int, str]]:
        return [(ph.start, ph.select) for ph in self.cfg.phases]

    def _plans(self, model: nn.Module) -> dict[int, Plan | None]:
        phases = sorted(self.phases(model.config.num_hidden_layers))
        late = [start for start, _ in phases if self.max_steps and start >= self.max_steps]
        if not phases or late:
            raise PfreezeError(
                f"arm '{self.name}' has no phase that starts before max_steps={self.max_steps}"
                if not phases or len(late) == len(phases) else
                f"arm '{self.name}': phase start {late[0]} is not before max_steps="
                f"{self.max_steps}",
                "start phases before max_steps (or raise training.max_steps)",
            )
        plans: dict[int, Plan | None] = {}
        if phases[0][0] > 0:
            plans[0] = None  # nothing trains before the first phase
        for start, select in phases:
            plans[start] = compile_plan(model, self.family, select)
        return plans

    def describe(self) -> str:
        return "scheduled: " + "; ".join(f"from step {p.start}: `{p.select}`"
                                         for p in self.cfg.phases)

