"""What every arm kind is: an `ArmStrategy`, and the registry of kinds.

An arm gets its own copy of θ₀ and answers two questions: which plan is in force at step k
(`plan_at`, None when it does not change), and how its model is built (`build`: a plain copy,
or a copy wrapped by peft). Everything else — data, optimizer, metrics — is the loop's,
kept per arm in an `ArmRun` (pfreeze.run.arm_run).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pfreeze.atomic import atomic_dir
from pfreeze.errors import PfreezeError
from pfreeze.plan.selectors import Plan, trainable_union
from pfreeze.settings import ArmConfig

# kind -> strategy class; each strategy's `Config` is the kind's settings class.
ARM_KINDS: dict[str, type[ArmStrategy]] = {}


def register(config: type[ArmConfig]) -> Callable[[type[ArmStrategy]], type[ArmStrategy]]:
    """Make the decorated strategy the arm kind named by `config.kind`; `config` is what the
    YAML's `arms: - {kind: <kind>, ...}` validates against."""
    kind = config.model_fields["kind"].default

    def deco(cls: type[ArmStrategy]) -> type[ArmStrategy]:
        cls.Config = config
        ARM_KINDS[kind] = cls
        return cls

    return deco


Calibration = Callable[[int], list[torch.Tensor]]  # n -> n batches of training text
Export = tuple[str, int, Callable[[], Any]]  # (file or folder name, bytes, writer)


def _bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


class ArmStrategy:
    """Base: a plain copy of θ₀ with one fixed plan."""

    Config: type[ArmConfig]  # the kind's settings class, set by @register
    # ‖ΔW‖ is tracked on the base weights by name; an arm whose model renames them says so.
    tracks_base_weights = True
    # Whether its plans can be shown before training (`pfreeze plan --config`); an arm that
    # chooses from training data cannot.
    plans_before_training = True
    # Whether it trains tensors of its own beside a frozen θ₀ (an adapter): the memory plan
    # then counts the base frozen.
    adapter = False

    def __init__(self, cfg: Any, family: str, max_steps: int = 0,
                 calibration: Calibration | None = None) -> None:
        self.cfg = cfg
        self.name: str = cfg.name
        self.family = family
        self.max_steps = max_steps
        self.calibration = calibration  # for data-driven arms; drawn apart from the stream
        self.plans: dict[int, Plan | None] = {}
        self.origin: dict[int, str] = {}  # id of a copied parameter -> its θ₀ name

    def build(self, base: nn.Module) -> nn.Module:
        model = self.copy_theta0(base)
        self.plans = self._plans(model)
        return model

    def copy_theta0(self, base: nn.Module) -> nn.Module:
        """This arm's copy of θ₀. `origin` keeps, per copied parameter (by id), the name of the
        θ₀ parameter it copies, so that the loop can point the ones this arm never trains at
        one device copy of θ₀ shared by all arms (pfreeze.run.shared)."""
        memo: dict[int, Any] = {}
        model = copy.deepcopy(base, memo)
        self.origin = {id(memo[id(p)]): n for n, p in base.named_parameters()}
        return model

    def _plans(self, model: nn.Module) -> dict[int, Plan | None]:
        raise NotImplementedError

    def plan_at(self, step: int) -> Plan | None:
        """The plan that starts at 0-based `step`, or None if the plan does not change."""
        return self.plans.get(step)

    def first_plan(self) -> Plan | None:
        return self.plans.get(0)

    @property
    def single_plan(self) -> bool:
        """One plan for the whole run: what the compiled step and the prefix cache need."""
        return len(self.plans) == 1

    def ever_trainable(self) -> int:
        """Elements trainable at some step (the union over phases, element by element)."""
        return trainable_union(self.plans.values())

    def describe(self) -> str:
        raise NotImplementedError

    def exports(self, model: nn.Module, folder: Path, pretrained: bool, tokenizer: Any
                ) -> list[Export]:
        """Files beside trained.safetensors, as (name, bytes, writer): the full model in
        transformers' format, when asked."""
        if not pretrained:
            return []

        def write(tmp: Path) -> None:
            model.save_pretrained(str(tmp))
            if hasattr(tokenizer, "tok"):
                tokenizer.tok.save_pretrained(str(tmp))

        return [("model", _bytes(model), lambda: atomic_dir(folder / "model", write))]

    def with_trained(self, base: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
        """θ₀ (`base`, changed in place) with this arm's trained tensors (as
        `trained_tensors` names them) written in: a plain transformers model. Each tensor is
        rounded to its parameter's storage dtype."""
        load_named(base, tensors)
        return base

    def trained_names(self) -> set[str]:
        return {n for p in self.plans.values() if p is not None for n in p.tensors}

    def trained_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Host copies of every tensor this arm trains, by name (for saving and snapshots).

        Clones, not views: tied weights share storage, which safetensors refuses to write twice.
        """
        params = dict(model.named_parameters())
        return {n: params[n].detach().cpu().clone().contiguous()
                for n in sorted(self.trained_names()) if n in params}


def load_named(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` into the parameters of the same names; a name or shape the model does
    not have is refused (the tensors were trained on another model)."""
    params = dict(model.named_parameters())
    for name, t in tensors.items():
        p = params.get(name)
        if p is None or p.shape != t.shape:
            got = "no such tensor" if p is None else f"shape {tuple(p.shape)}"
            raise PfreezeError(
                f"the trained tensor {name} {tuple(t.shape)} does not fit the model ({got})",
                "apply it to the model the run trained (its config's model.name)")
        with torch.no_grad():
            p.copy_(t)


def make_arm(cfg: Any, family: str, max_steps: int = 0,
             calibration: Calibration | None = None) -> ArmStrategy:
    """The strategy for one arm config (any kind registered above)."""
    return ARM_KINDS[cfg.kind](cfg, family, max_steps, calibration)


