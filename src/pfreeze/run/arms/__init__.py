"""Arm kinds: small strategies that decide what trains, plugged into the one training loop.

Each kind is one module here holding its settings class (a `pfreeze.settings.ArmConfig` with
`kind: Literal["<kind>"]`) and its strategy (an `ArmStrategy` decorated with
`@register(<its settings class>)`). The imports below are the registry: a new kind is a new
module plus one line here (docs/ARCHITECTURE.md has a worked example).
"""

from pfreeze.run.arms import full, grad, lisa, lora, plan, schedule, snr, unfreeze  # noqa: F401
from pfreeze.run.arms.base import ARM_KINDS, ArmStrategy, Calibration, make_arm, register

__all__ = ["ARM_KINDS", "ArmStrategy", "Calibration", "make_arm", "register"]
