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
    # running an experiment: the config tree and the one call that runs it
    "RunConfig": "pfreeze.config",
    "load_config": "pfreeze.config",
    "run": "pfreeze.run.session",
    # settings of each part, and the arm kinds the benchmark builds
    "DataConfig": "pfreeze.settings",
    "TrainingConfig": "pfreeze.settings",
    "GenerationConfig": "pfreeze.settings",
    "FullArm": "pfreeze.run.arms.full",
    "PlanArm": "pfreeze.run.arms.plan",
    # models and plans: load a model (or a random shape), select the tensors that train
    "load_model": "pfreeze.models.load",
    "model_config": "pfreeze.models.load",
    "meta_model": "pfreeze.models.load",
    "family_of": "pfreeze.models.load",
    "compile_plan": "pfreeze.plan.selectors",
    "describe_params": "pfreeze.models.families",
    "Geometry": "pfreeze.models.families",
    "first_trained_block": "pfreeze.models.families",
    # training: the loop (built without run files to step arms), its batch stream and step
    "Loop": "pfreeze.run.loop",
    "BatchStream": "pfreeze.data.corpus",
    "LossOf": "pfreeze.run.step",
    "training_attention": "pfreeze.run.attention",
    # execution: device choice, freeing compiled graphs between runs, the environment probe
    "pick_device": "pfreeze.run.runtime",
    "release": "pfreeze.run.runtime",
    "environment": "pfreeze.outputs.files",
    # generation: the batched sampling behind the p metric
    "generate_samples": "pfreeze.measure.generation",
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
