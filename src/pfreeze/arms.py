"""Arms: small strategies that decide what trains, plugged into the one training loop.

An arm gets its own copy of θ₀ and answers two questions: which plan is in force at step k
(`plan_at`, None when it does not change), and how its model is built (`build`: a plain copy,
or a copy wrapped by peft). Everything else — data, optimizer, metrics — is the loop's,
kept per arm in an `ArmRun`. Register a new kind with `@register("name")` next to its config
class in config.py.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pfreeze.architectures import describe_params
from pfreeze.atomic import atomic_dir
from pfreeze.config import TrainingConfig
from pfreeze.errors import PfreezeError
from pfreeze.models import state_hash
from pfreeze.plan import Plan, compile_plan, full_plan, trainable_union

if TYPE_CHECKING:
    from pfreeze.masking import Freezer, Tracker
    from pfreeze.prefix import PrefixCache

ARM_KINDS: dict[str, type[ArmStrategy]] = {}


def register(kind: str) -> Callable[[type[ArmStrategy]], type[ArmStrategy]]:
    def deco(cls: type[ArmStrategy]) -> type[ArmStrategy]:
        ARM_KINDS[kind] = cls
        return cls

    return deco


Calibration = Callable[[int], list[torch.Tensor]]  # n -> n batches of training text
Export = tuple[str, int, Callable[[], Any]]  # (file or folder name, bytes, writer)


def _bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


class ArmStrategy:
    """Base: a plain copy of θ₀ with one fixed plan."""

    # ‖ΔW‖ is tracked on the base weights by name; an arm whose model renames them says so.
    tracks_base_weights = True

    def __init__(self, cfg: Any, family: str, max_steps: int = 0,
                 calibration: Calibration | None = None) -> None:
        self.cfg = cfg
        self.name: str = cfg.name
        self.family = family
        self.max_steps = max_steps
        self.calibration = calibration  # for data-driven arms; drawn apart from the stream
        self.plans: dict[int, Plan | None] = {}

    def build(self, base: nn.Module) -> nn.Module:
        model = copy.deepcopy(base)
        self.plans = self._plans(model)
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

    def trained_names(self) -> set[str]:
        return {n for p in self.plans.values() if p is not None for n in p.tensors}

    def trained_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Host copies of every tensor this arm trains, by name (for saving and snapshots).

        Clones, not views: tied weights share storage, which safetensors refuses to write twice.
        """
        params = dict(model.named_parameters())
        return {n: params[n].detach().cpu().clone().contiguous()
                for n in sorted(self.trained_names()) if n in params}


@register("full")
class Full(ArmStrategy):
    def _plans(self, model: nn.Module) -> dict[int, Plan | None]:
        return {0: full_plan(model, self.family)}

    def describe(self) -> str:
        return "full fine-tuning: every parameter trains"


@register("plan")
class Planned(ArmStrategy):
    def _plans(self, model: nn.Module) -> dict[int, Plan | None]:
        return {0: compile_plan(model, self.family, self.cfg.select)}

    def describe(self) -> str:
        return f"precision-frozen: only `{self.cfg.select}` trains"


@register("schedule")
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


@register("unfreeze")
class GradualUnfreeze(Scheduled):
    """ULMFiT-style: the top `start_layers` blocks train, one more block joins every `every`."""

    def phases(self, n_layers: int) -> list[tuple[int, str]]:
        c = self.cfg
        if c.start_layers > n_layers:
            raise PfreezeError(f"arm '{self.name}': start_layers={c.start_layers} but the model "
                               f"has {n_layers} blocks", f"use start_layers <= {n_layers}")
        within = f" {c.within}" if c.within else ""
        out, n, step = [], c.start_layers, 0
        while step < self.max_steps and n <= n_layers:
            out.append((step, f"layers=-{n}:{within}"))
            n, step = n + 1, step + c.every
        return out

    def describe(self) -> str:
        c = self.cfg
        return (f"gradual unfreezing: top {c.start_layers} block(s), one more every {c.every} "
                f"steps" + (f", `{c.within}` only" if c.within else ""))


@register("lisa")
class Lisa(Scheduled):
    """LISA-style: `gamma` random blocks train, resampled every `interval` steps (seeded)."""

    def phases(self, n_layers: int) -> list[tuple[int, str]]:
        c = self.cfg
        if c.gamma > n_layers:
            raise PfreezeError(f"LISA arm '{self.name}': gamma={c.gamma} but the model has "
                               f"{n_layers} blocks", f"use gamma <= {n_layers}")
        gen = torch.Generator().manual_seed(c.seed)
        out = []
        for start in range(0, self.max_steps, c.interval):
            blocks = sorted(torch.randperm(n_layers, generator=gen)[: c.gamma].tolist())
            select = f"layers={','.join(map(str, blocks))}" + (f" {c.within}" if c.within else "")
            out.append((start, select + (f"; {c.always}" if c.always else "")))
        return out

    def describe(self) -> str:
        c = self.cfg
        return (f"LISA: {c.gamma} random block(s) every {c.interval} steps (seed {c.seed})"
                + (f", always `{c.always}`" if c.always else ""))


@register("snr")
class SnrSelected(ArmStrategy):
    """Spectrum-style: the top `top_percent` % of each matrix type by SNR score trains."""

    def _plans(self, model: nn.Module) -> dict[int, Plan | None]:
        from pfreeze.rank import snr_scores, top_selector

        roles = set(self.cfg.roles.split(","))
        self.selector = top_selector(snr_scores(model, self.family, roles), self.cfg.top_percent)
        return {0: compile_plan(model, self.family, self.selector)}

    def describe(self) -> str:
        return f"SNR-selected: top {self.cfg.top_percent:g}% of each of {self.cfg.roles} by score"


@register("grad")
class GradSelected(ArmStrategy):
    """The top `top_percent` % of each matrix type by mean gradient norm on calibration data.

    The loop hands the arm a `calibration` source that draws batches with their own seed from
    the training text, so selecting never consumes the shared batch stream.
    """

    def _plans(self, model: nn.Module) -> dict[int, Plan | None]:
        from pfreeze.rank import grad_scores, top_selector

        if not self.calibration:
            raise PfreezeError(f"arm '{self.name}' needs calibration batches",
                               "run it through pfreeze run (the loop provides them)")
        roles = set(self.cfg.roles.split(","))
        scores = grad_scores(model, self.family, self.calibration(self.cfg.batches), roles)
        self.selector = top_selector(scores, self.cfg.top_percent)
        return {0: compile_plan(model, self.family, self.selector)}

    def describe(self) -> str:
        return (f"gradient-selected: top {self.cfg.top_percent:g}% of each of {self.cfg.roles} "
                f"by mean gradient norm over {self.cfg.batches} batches")


@register("lora")
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
        from pfreeze.architectures import ParamInfo, Rule
        from pfreeze.plan import TensorPlan

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


def make_arm(cfg: Any, family: str, max_steps: int = 0,
             calibration: Calibration | None = None) -> ArmStrategy:
    """The strategy for one arm config (any kind registered above)."""
    return ARM_KINDS[cfg.kind](cfg, family, max_steps, calibration)


def build_optimizer(params: list[nn.Parameter], t: TrainingConfig, device: torch.device
                    ) -> torch.optim.Optimizer:
    # Norms and biases are not decayed (as in HF Trainer); the Freezer keeps masked elements.
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if t.optim == "sgd":
        return torch.optim.SGD(groups, lr=t.learning_rate, momentum=t.momentum)
    fused = device.type == "cuda"
    if t.optim == "adamw_fused" and not fused:
        raise PfreezeError("optim=adamw_fused needs a CUDA GPU", "use optim=adamw on CPU")
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                             eps=t.adam_epsilon, fused=fused)


@dataclass
class StepRecord:
    """One optimizer step of one arm as the step leaves it: device tensors and timers, read
    back all at once at the next flush (reading each would make the host wait per step)."""

    step: int  # 1-based: the step just completed
    loss: torch.Tensor  # the mean loss over the step's micro-batches, on the device
    dw: torch.Tensor  # ‖W_t − W_{t−1}‖_F per tracked matrix, aligned with Tracker.keys
    dw0: torch.Tensor  # ‖W_t − W₀‖_F, likewise
    start: Any  # a CUDA event or a host time
    end: Any
    mem_mb: float | None  # peak memory allocated in the step (GPU)
    lr: float  # the learning rate the step used

    def seconds(self) -> float:
        if hasattr(self.start, "elapsed_time"):  # CUDA events (after a synchronize)
            return self.start.elapsed_time(self.end) / 1000
        return self.end - self.start


@dataclass
class ArmRun:
    """One arm's live state inside the loop."""

    strategy: ArmStrategy
    model: nn.Module
    freezer: Freezer
    optimizer: torch.optim.Optimizer
    scheduler: Any
    tracker: Tracker
    theta0_hash: str
    step_fn: Any = None  # compiled execution.LossOf (returns the loss tensor only), or None
    prefix: PrefixCache | None = None  # the frozen prefix's cache, when this arm has one
    prefix_note: str = ""  # "blocks 0-14 cached", or why there is no cache
    pending: list[StepRecord] = field(default_factory=list)  # read back at the next flush

    @property
    def step_model(self) -> nn.Module:
        """What a training step runs: the model, or a cached arm's upper blocks."""
        return self.model if self.prefix is None else self.prefix.upper
    losses: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    evals: list[tuple[int, float | None, float | None]] = field(default_factory=list)
    peak_mem_mb: float | None = None
    stopped: str | None = None  # why this arm stopped early, if it did
    diverged: bool = False  # non-finite loss: no evaluation or sampling is possible
    best: tuple[int, float] | None = None  # (step, held-out loss) of the best evaluation
    best_state: dict[str, torch.Tensor] | None = None  # trained tensors at `best`
    bad_evals: int = 0

    def prefix_summary(self) -> dict[str, Any]:
        """What the frozen-prefix cache did, or why this arm has none."""
        return self.prefix.summary() if self.prefix else {"off": self.prefix_note}
