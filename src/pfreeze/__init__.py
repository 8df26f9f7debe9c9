"""pfreeze: targeted fine-tuning with precision freezing, measured against full fine-tuning.

The names below are the public API: code outside the package (the benchmark in `bench/`)
imports them from `pfreeze` only, never from a submodule, whose layout may change. They load
on first use (PEP 562), so `import pfreeze` stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from pfreeze.errors import PfreezeError

__version__ = "0.1.0"

_PUBLIC = {
    # configs: a run's settings, and the arm kinds the benchmark builds
    "RunConfig": "pfreeze.config",
    "DataConfig": "pfreeze.config",
    "TrainingConfig": "pfreeze.config",
    "GenerationConfig": "pfreeze.config",
    "FullArm": "pfreeze.config",
    "PlanArm": "pfreeze.config",
    # models and plans: load a model (or a random shape), select the tensors that train
    "load_model": "pfreeze.models",
    "compile_plan": "pfreeze.plan",
    "describe_params": "pfreeze.architectures",
    "Geometry": "pfreeze.architectures",
    "first_trained_block": "pfreeze.architectures",
    # training: the loop (built without run files to step arms), its batch stream and step
    "Loop": "pfreeze.train",
    "BatchStream": "pfreeze.corpus",
    "LossOf": "pfreeze.execution",
    "training_attention": "pfreeze.attention",
    # execution: device choice, freeing compiled graphs between runs, the environment probe
    "pick_device": "pfreeze.execution",
    "release": "pfreeze.execution",
    "environment": "pfreeze.outputs",
    # generation: the batched sampling behind the p metric
    "generate_samples": "pfreeze.evaluate",
}

__all__ = ["PfreezeError", "__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if (module := _PUBLIC.get(name)) is None:
        raise AttributeError(f"module 'pfreeze' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # once: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
