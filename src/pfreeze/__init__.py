"""pfreeze: targeted fine-tuning with precision freezing, measured against full fine-tuning.

The names below are the public API: code outside the package (the benchmark in `bench/`, a
notebook) imports them from `pfreeze` only, never from a submodule, whose layout may change.
They load on first use (PEP 562), so `import pfreeze` stays fast.

    result = pfreeze.run("configs/moby-dick.yaml", training={"max_steps": 10})
    pfreeze.plan("random:llama", "layers=50%: roles=q,k,v")   # a pandas DataFrame
"""

from __future__ import annotations

import sys
from importlib import import_module
from types import ModuleType
from typing import Any

from pfreeze.errors import PfreezeError

__version__ = "0.1.0"

_PUBLIC = {
    # running an experiment from Python: its results as tables (pfreeze.api); the config tree
    "Result": "pfreeze.api",
    "load_result": "pfreeze.api",
    "RunConfig": "pfreeze.config",
    "load_config": "pfreeze.config",
    # an arm as a transformers model directory
    "export_arm": "pfreeze.export",
    "apply_delta": "pfreeze.export",
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
    "meta_of": "pfreeze.models.load",
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

# Functions named like a subpackage of theirs: `pfreeze.run(...)` runs an experiment while
# `pfreeze.run.session` stays the module (see _Package).
_CALLABLE_PACKAGES = ("run", "plan")

__all__ = ["PfreezeError", "__version__", *_CALLABLE_PACKAGES, *_PUBLIC]


class _CallablePackage(ModuleType):
    """A subpackage (pfreeze.run, pfreeze.plan) that is also pfreeze.api's function of its
    name: calling it calls the function, its attributes stay the subpackage's."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(import_module("pfreeze.api"), self.__name__.rsplit(".", 1)[1])(
            *args, **kwargs)


class _Package(ModuleType):
    """pfreeze itself. Importing a subpackage sets it as an attribute of its parent
    (`pfreeze.run = <module pfreeze.run>`), which would hide the function pfreeze.run; each
    such subpackage is made callable as it is set, so both spellings hold at any time."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _CALLABLE_PACKAGES and isinstance(value, ModuleType):
            value.__class__ = _CallablePackage
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name in _CALLABLE_PACKAGES:
        import_module(f"pfreeze.{name}")  # sets the attribute (made callable) on the way
        return globals()[name]
    if (module := _PUBLIC.get(name)) is None:
        raise AttributeError(f"module 'pfreeze' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # once: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
