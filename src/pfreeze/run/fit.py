"""Whether a run's arms fit on its device, decided before anything loads: the memory plan
(pfreeze.plan.memory) of the config's model, built on the meta device, and the one-line stop
when the arms cannot fit together."""

from __future__ import annotations

import torch
from torch import nn

from pfreeze.errors import PfreezeError
from pfreeze.models.load import family_of, meta_model, model_config, storage_dtype
from pfreeze.plan import memory
from pfreeze.plan.selectors import Plan, compile_plan, full_plan
from pfreeze.run.activations import lowest_trained_block
from pfreeze.run.arms import ArmStrategy, make_arm
from pfreeze.settings import RunSpec


def memory_plan(cfg: RunSpec, device: torch.device, bf16: bool) -> memory.MemoryPlan:
    """Per arm, the bytes it needs on `device` (bf16: the step runs under bf16 autocast)."""
    config, own = model_config(cfg.model.name, cfg.model.revision)
    storage = storage_dtype(cfg.model.dtype, config if own else None)
    model = meta_model(config)
    family = family_of(model)
    t = cfg.training
    master = torch.float32 if t.master_weights == "fp32" else storage
    shape = memory.Shape.of(config)
    tokens = t.per_device_train_batch_size * cfg.data.block_size
    arms = []
    for acfg in cfg.arms:
        strat = make_arm(acfg, family, t.max_steps)
        arm_model, plans, note, lowest = arm_plans(strat, model, family)
        act = memory.activation_bytes(shape, tokens, lowest, bf16 or storage != torch.float32,
                                      t.gradient_checkpointing)
        arms.append(memory.arm_memory(str(acfg.name), arm_model, plans, storage, master,
                                      t.optim, t.momentum, act, note))
    base = 0
    if device.type == "cpu":  # θ₀ stays in host memory beside the arms while they are made
        base = sum(p.numel() for p in model.parameters()) * storage.itemsize
    return memory.MemoryPlan(arms, base, memory.free_bytes(device), str(device))


def arm_plans(strat: ArmStrategy, model: nn.Module, family: str
               ) -> tuple[nn.Module, list[Plan | None], str, int | None]:
    """What an arm trains, built on the meta model: its model, plans, a note, and its lowest
    trained block (None: nothing trains). A note says the plans are an estimate: what
    trains is chosen at run time (from data or weights) or made then (adapters)."""
    if not strat.plans_before_training:  # chosen from training data: at most everything
        return (model, [full_plan(model, family)], "upper bound (chosen from the training "
                "data at run time)", 0)
    try:
        arm_model = strat.build(model)
    except (NotImplementedError, RuntimeError):
        # A kind whose build reads weights cannot build on the meta device. One that chooses
        # what trains from them (SNR) counts as training everything; an adapter (LoRA: it
        # hashes its θ₀) has its own small tensors left out, the base counted frozen, and
        # backward reaching down to the lowest block its selector adapts.
        if not strat.adapter:
            return (model, [full_plan(model, family)], "upper bound (chosen from the "
                    "weights at run time)", 0)
        select = getattr(strat.cfg, "select", None)
        adapted = compile_plan(model, family, select).tensors if select else {}
        return (model, [], "adapter tensors not counted (they are made at run time)",
                lowest_trained_block(adapted, family) if adapted else 0)
    plans = list(strat.plans.values())
    names = {n for p in plans if p is not None for n in p.tensors}
    return arm_model, plans, "", lowest_trained_block(names, family) if names else None


def placement(plan: memory.MemoryPlan, wanted: str) -> str:
    """Where the arms go (together or sequential), or a one-line stop when they cannot fit
    that way: `wanted` is arms_placement (auto picks together wherever it fits)."""
    if wanted == "together" or (wanted == "auto" and plan.fits):
        _stop_unless(plan.fits, plan, plan.together, "together", plan.fits_alone)
        return "together"
    _stop_unless(plan.fits_alone, plan, plan.alone, "one at a time", False)
    return "sequential"


def _stop_unless(fits: bool, plan: memory.MemoryPlan, need: int, how: str,
                 could_sequence: bool) -> None:
    if fits:
        return
    big = max(plan.arms, key=lambda a: a.total)
    raise PfreezeError(
        f"the arms need about {memory.mib(need):,.0f} MiB {how} but {plan.device} "
        f"has {memory.mib(plan.free or 0):,.0f} MiB free (largest: '{big.name}', "
        f"{memory.mib(big.total):,.0f} MiB; `pfreeze plan --config` shows each arm)",
        "lower training.per_device_train_batch_size, set training.gradient_checkpointing=true "
        "or model.dtype=bfloat16, " + ("set arms_placement=sequential, " if could_sequence
                                       else "") + "or run fewer arms")
