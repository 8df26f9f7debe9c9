"""LoRA through peft on the modules a selector picks; the base weights stay frozen."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from torch import nn

from pfreeze.atomic import atomic_dir
from pfreeze.errors import PfreezeError
from pfreeze.models.families import describe_params
from pfreeze.models.load import state_hash
from pfreeze.plan.selectors import Plan, compile_plan
from pfreeze.run.arms.base import ArmStrategy, Export, register
from pfreeze.settings import ArmConfig


class LoraArm(ArmConfig):
    kind: Literal["lora"] = "lora"
    select: str = "roles=q,k,v"
    r: int = Field(8, ge=1)
    alpha: float = 16.0
    dropout: float = Field(0.0, ge=0, lt=1)



@register(LoraArm)
class Lora(ArmStrategy):
    """LoRA through peft on the modules the selector picks; base weights stay frozen."""

    tracks_base_weights = False  # peft renames the base weights (base_model.model...)

    def build(self, base: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        model = copy.deepcopy(base)
        # θ₀ is the base model; the adapters (B = 0) start as an exact no-op on top of it.
        self.theta0_hash = state_hash(model)
        plan = compile_plan(model, self.family, self.cfg.select)
        infos = describe_params(model, self.family)
        targets = sorted({n.rsplit(".", 1)[0] for n in plan.tensors if len(infos[n].shape) >= 2})
        if not targets:
            raise PfreezeError(f"LoRA arm '{self.name}': '{self.cfg.select}' selects no matrix",
                               "select weight matrices, e.g. roles=q,k,v")
        partial = [n for n, t in plan.tensors.items() if t.mask is not None]
        if partial:
            raise PfreezeError(
                f"LoRA arm '{self.name}': '{self.cfg.select}' selects parts of {partial[0]}",
                "LoRA adapts whole modules: drop heads=/slices, or use a plan arm",
            )
        lcfg = LoraConfig(r=self.cfg.r, lora_alpha=self.cfg.alpha, lora_dropout=self.cfg.dropout,
                          target_modules=targets, fan_in_fan_out=self.family == "gpt2")
        model = get_peft_model(model, lcfg)
        adapter = {n: p for n, p in model.named_parameters() if p.requires_grad}
        from pfreeze.models.families import ParamInfo, Rule
        from pfreeze.plan.selectors import TensorPlan

        infos_all = {n: ParamInfo(n, tuple(p.shape), None, Rule(".*", "lora"))
                     for n, p in model.named_parameters()}
        self.plans = {0: Plan(self.cfg.select, {n: TensorPlan(None, p.numel(), ["lora"])
                                                for n, p in adapter.items()}, infos_all)}
        self.targets = targets
        return model

    def exports(self, model: nn.Module, folder: Path, pretrained: bool, tokenizer: Any
                ) -> list[Export]:
        adapter = {n: p for n, p in model.named_parameters() if p.requires_grad}
        nbytes = sum(p.numel() * p.element_size() for p in adapter.values())
        # The PEFT adapter format, always.
        return [("adapter", nbytes,
                 lambda: atomic_dir(folder / "adapter", lambda t: model.save_pretrained(str(t))))]

    def describe(self) -> str:
        return f"LoRA r={self.cfg.r}, alpha={self.cfg.alpha} on `{self.cfg.select}`"

