"""LoRA through peft on the modules a selector picks; the base weights stay frozen."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from pfreeze.atomic import atomic_dir
from pfreeze.errors import PfreezeError
from pfreeze.models.families import ParamInfo, describe_params
from pfreeze.models.layouts import FUSED
from pfreeze.models.load import state_hash
from pfreeze.plan.selectors import Plan, compile_plan
from pfreeze.run.arms.base import ArmStrategy, Export, load_named, register
from pfreeze.settings import ArmConfig


class LoraArm(ArmConfig):
    kind: Literal["lora"] = "lora"
    select: str = "roles=q,k,v"
    r: int = Field(8, ge=1)
    alpha: float = 16.0
    dropout: float = Field(0.0, ge=0, lt=1)



def _refuse_fused_parts(arm: str, select: str, plan: Plan, infos: dict[str, ParamInfo]
                        ) -> None:
    """LoRA adapts whole Linear modules: not one role of a fused matrix, nor 3-D experts."""
    for name, tp in plan.tensors.items():
        info = infos[name]
        if info.rule.experts:
            raise PfreezeError(f"LoRA arm '{arm}': '{select}' selects MoE experts ({name})",
                               "experts are 3-D parameters, not Linear modules: train them "
                               "with a plan arm (e.g. roles=experts experts=0,3)")
        fused = FUSED.get(info.rule.layout)
        if fused and tp.mask is not None:
            raise PfreezeError(
                f"LoRA arm '{arm}': '{select}' selects part of the fused {name}, which holds "
                f"{', '.join(fused)} in one matrix",
                f"adapt the whole module (roles={','.join(fused)}), or train the part alone "
                "with a plan arm")


@register(LoraArm)
class Lora(ArmStrategy):
    """LoRA through peft on the modules the selector picks; base weights stay frozen."""

    tracks_base_weights = False  # peft renames the base weights (base_model.model...)
    adapter = True

    def build(self, base: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        model = self.copy_theta0(base)
        # θ₀ is the base model; the adapters (B = 0) start as an exact no-op on top of it.
        self.theta0_hash = state_hash(model)
        plan = compile_plan(model, self.family, self.cfg.select)
        infos = describe_params(model, self.family)
        targets = sorted({n.rsplit(".", 1)[0] for n in plan.tensors if len(infos[n].shape) >= 2})
        if not targets:
            raise PfreezeError(f"LoRA arm '{self.name}': '{self.cfg.select}' selects no matrix",
                               "select weight matrices, e.g. roles=q,k,v")
        _refuse_fused_parts(self.name, self.cfg.select, plan, infos)
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
        from pfreeze.models.families import Rule
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

    def with_trained(self, base: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
        """The adapters on θ₀, merged into its weights by peft (merge_and_unload)."""
        model = self.build(base)
        load_named(model, tensors)
        return model.merge_and_unload()

    def describe(self) -> str:
        return f"LoRA r={self.cfg.r}, alpha={self.cfg.alpha} on `{self.cfg.select}`"

