"""The run configuration: one pydantic tree, loaded from YAML, overridable with `--set`.

Every model forbids unknown keys, so a typo is an error that names its path and the closest
valid key instead of a silently ignored setting. Training names follow transformers'
TrainingArguments so a practitioner can carry settings over unchanged.
"""

from __future__ import annotations

import copy
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pfreeze.errors import PfreezeError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    # `smollm2-135m` (embedded GGUF), an HF hub id, a local directory, or `random:<family>`.
    name: str = "smollm2-135m"
    revision: str | None = None


class DataConfig(_Strict):
    # A local text file or `gutenberg:<id>` (downloaded once, then cached).
    corpus: str = "gutenberg:2701"
    encoding: str | None = None
    strip_gutenberg: bool = True
    validation_fraction: float = Field(0.1, ge=0.0, le=0.5)
    block_size: int = Field(256, ge=8, description="tokens per training window")
    top_k: int = Field(100, ge=1, description="size of the frequent-token set S_k for p")
    # random: windows start anywhere. epochs: aligned chunks, reshuffled every epoch; chunks
    # recur, so an arm frozen below block f can reuse block f's cached input (prefix_cache).
    sampling: Literal["random", "epochs"] = "random"


class TrainingConfig(_Strict):
    learning_rate: float = Field(1e-4, gt=0)
    per_device_train_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_steps: int = Field(40, ge=1)
    warmup_steps: int = Field(0, ge=0)
    # Extra arguments of the schedule, as in TrainingArguments (e.g. {min_lr_rate: 0.1} for
    # cosine_with_min_lr, {num_decay_steps: 100} for warmup_stable_decay).
    lr_scheduler_kwargs: dict[str, Any] = Field(default_factory=dict)
    lr_scheduler_type: str = "linear"
    optim: Literal["adamw", "adamw_fused", "sgd"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only")
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    bf16: bool | Literal["auto"] = "auto"
    logging_steps: int = Field(10, ge=1, description="how often the host reads device metrics")
    eval_steps: int = Field(10, ge=1)
    eval_batches: int = Field(4, ge=1, description="held-out batches per evaluation")
    save_steps: int = Field(0, ge=0, description="checkpoint every N steps (0: never)")
    # Stop an arm after this many evaluations without a better held-out loss (None: never).
    early_stopping_patience: int | None = Field(None, ge=1)
    keep_best: bool = Field(False, description="save each arm's tensors at its best eval")
    integrity_steps: int = Field(0, ge=0,
                                 description="audit frozen elements every N steps (0: end)")
    device: str = "auto"  # auto, cpu, cuda, cuda:N (mps, xpu where torch has them)
    # auto: compile on a GPU when max_steps >= 1000 (execution.COMPILE_PAYS_AFTER: then the
    # compilation is paid back even on a cold cache); never on CPU.
    torch_compile: bool | Literal["auto"] = "auto"
    # reduce-overhead captures the compiled step in CUDA graphs (no per-kernel launch cost).
    # auto: reduce-overhead on a GPU unless gradient_accumulation_steps > 1 (graph replays
    # reuse their output buffers), else default; measured in docs/BENCHMARKS.md.
    torch_compile_mode: Literal["auto", "default", "reduce-overhead", "max-autotune"] = "auto"
    # Reuse the input of the lowest trained block for windows seen before (exact: that input
    # depends only on frozen weights). auto: wherever possible when data.sampling=epochs.
    prefix_cache: bool | Literal["auto"] = "auto"
    # The attention kernel of training steps. model: the model's own (under torch.compile
    # that is cuDNN with an explicit causal mask). flash: FlashAttention with is_causal and no
    # mask (pfreeze.attention); sdpa: the same path, SDPA picks the kernel. auto: sdpa on a
    # GPU with bf16 and CUDA graphs where it computes the same attention, else model.
    # Evaluation and sampling keep the model's own attention.
    attention_backend: Literal["auto", "model", "flash", "sdpa", "cudnn", "efficient",
                               "math"] = "auto"

    @field_validator("device")
    @classmethod
    def _a_device(cls, v: str) -> str:
        if v == "auto":
            return v
        try:
            import torch

            torch.device(v)
        except (RuntimeError, ValueError):
            raise ValueError(f"{v!r} is not a device: use auto, cpu, cuda or cuda:N") from None
        return v

    @field_validator("lr_scheduler_type")
    @classmethod
    def _a_schedule(cls, name: str, info: ValidationInfo) -> str:
        """Build the schedule once on a dummy optimizer: a misspelt name or a schedule that
        lacks its arguments is refused now, before any model is loaded."""
        import torch
        from transformers import SchedulerType, get_scheduler

        names = [s.value for s in SchedulerType if s.value not in _NEEDS_A_METRIC]
        kwargs = info.data.get("lr_scheduler_kwargs") or {}
        if name in _NEEDS_A_METRIC:
            raise ValueError(f"lr_scheduler_type={name} steps on a validation metric, not per "
                             f"step: use one of {', '.join(names)}")
        if name not in names:
            raise ValueError(f"unknown lr_scheduler_type {name!r}: use one of {', '.join(names)}")
        dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        try:
            get_scheduler(name, dummy, num_warmup_steps=info.data.get("warmup_steps", 0),
                          num_training_steps=info.data.get("max_steps", 1),
                          scheduler_specific_kwargs=kwargs or None)
        except (TypeError, ValueError) as e:
            raise ValueError(f"lr_scheduler_type={name} with lr_scheduler_kwargs={kwargs}: "
                             f"{_one_line(e)}") from None
        return name


# Schedules that step on a metric (ReduceLROnPlateau-like): pfreeze steps schedules per step.
_NEEDS_A_METRIC = ("reduce_lr_on_plateau", "greedy")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


class GenerationConfig(_Strict):
    # The same prompts and seeds are used for every arm, before and after training.
    prompts: list[str] = Field(
        default_factory=lambda: ["Call me", "The whale", "It was a", "Upon the deck"],
        min_length=1,
    )
    samples_per_prompt: int = Field(2, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(50, ge=1)
    seed: int = 1234
    # generate: transformers' generate(). pfreeze: pfreeze.sampler, the decode step as one
    # graph (CUDA graphs on a GPU), no per-token host work; Llama, GPT-2, GPT-NeoX; needs top_k.
    # auto: pfreeze on a GPU where it can serve the model, else generate.
    decoder: Literal["auto", "generate", "pfreeze"] = "auto"


_ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class _ArmBase(_Strict):
    # Becomes a folder name (arms/<name>/) and a label in tables: no separators or spaces.
    name: str | None = None

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        if v is not None and not _ARM_NAME.fullmatch(v):
            raise ValueError(f"arm name {v!r} must be letters, digits, '.', '_' or '-' "
                             "(it names the folder arms/<name>/)")
        return v


class FullArm(_ArmBase):
    kind: Literal["full"] = "full"


class PlanArm(_ArmBase):
    kind: Literal["plan"] = "plan"
    # Selector language (see plan.py); default: q, k, v of the upper half of the blocks.
    select: str = "layers=50%: roles=q,k,v"


class LoraArm(_ArmBase):
    kind: Literal["lora"] = "lora"
    select: str = "roles=q,k,v"
    r: int = Field(8, ge=1)
    alpha: float = 16.0
    dropout: float = Field(0.0, ge=0, lt=1)


class PhaseConfig(_Strict):
    start: int = Field(ge=0, description="first step (0-based) at which this plan trains")
    select: str


class ScheduleArm(_ArmBase):
    kind: Literal["schedule"] = "schedule"
    phases: list[PhaseConfig] = Field(min_length=1)


class UnfreezeArm(_ArmBase):
    """ULMFiT-style gradual unfreezing, top down."""

    kind: Literal["unfreeze"] = "unfreeze"
    every: int = Field(10, ge=1, description="steps between unfreezing one more block")
    start_layers: int = Field(1, ge=1)
    within: str = Field("", description="selector terms applied inside the blocks, e.g. roles=attn")


class LisaArm(_ArmBase):
    """LISA-style layerwise sampling: gamma random blocks train, resampled every interval."""

    kind: Literal["lisa"] = "lisa"
    gamma: int = Field(2, ge=1)
    interval: int = Field(20, ge=1)
    seed: int = 0
    within: str = ""
    always: str | None = Field(None, description="selector trained in every phase, e.g. roles=norm")


class SnrArm(_ArmBase):
    """Spectrum-style: the top share of each matrix type by SNR score trains."""

    kind: Literal["snr"] = "snr"
    top_percent: float = Field(25.0, gt=0, le=100)
    roles: str = "q,k,v,o"


class GradArm(_ArmBase):
    """Data-driven selection: the top share of each matrix type by mean gradient norm."""

    kind: Literal["grad"] = "grad"
    top_percent: float = Field(25.0, gt=0, le=100)
    roles: str = "q,k,v,o"
    batches: int = Field(4, ge=1, description="calibration batches from the training text")


Arm = Annotated[FullArm | PlanArm | LoraArm | ScheduleArm | UnfreezeArm | LisaArm | SnrArm
                | GradArm, Field(discriminator="kind")]


class RunConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    arms: list[Arm] = Field(default_factory=lambda: [FullArm(), PlanArm()], min_length=1,
                            validate_default=True)
    # Which matrices get per-step ‖ΔW‖ (selector language; tracked in every arm).
    track: str = "roles=q,k,v,o"
    output_dir: str = "runs/latest"
    save_pretrained: bool = False
    # Run the whole paired experiment this many times (seed + r); statistics over repeats.
    repeats: int = Field(1, ge=1)

    @field_validator("arms")
    @classmethod
    def _unique_arm_names(cls, arms: list[Any]) -> list[Any]:
        named = [a.name for a in arms if a.name is not None]
        for name in named:
            if named.count(name) > 1:
                raise ValueError(f"two arms are named {name!r}; give each arm a unique name")
        # Unnamed arms are called after their kind (plan, plan2, ...), never taking a name
        # that another arm was given explicitly.
        taken = set(named)
        for arm in arms:
            if arm.name is None:
                name, i = arm.kind, 1
                while name in taken:
                    i += 1
                    name = f"{arm.kind}{i}"
                arm.name = name
                taken.add(name)
        return arms

    @model_validator(mode="after")
    def _prefix_needs_epochs(self) -> RunConfig:
        if self.training.prefix_cache is True and self.data.sampling != "epochs":
            raise ValueError("training.prefix_cache=true needs data.sampling=epochs: with "
                             "random windows no window repeats, so nothing could be reused")
        return self


# --------------------------------------------------------------------------- loading


def _inner(ann: Any) -> Any:
    """The model behind an annotation: a BaseModel, {tag: model} for a tagged union, or None."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (list, Annotated):
        return _inner(args[0])
    if origin in (typing.Union, types.UnionType):
        members = [m for m in map(_inner, args) if isinstance(m, type)]
        tags = {m.model_fields["kind"].default: m for m in members if "kind" in m.model_fields}
        if len(tags) > 1:
            return tags
        return members[0] if len(members) == 1 else None
    return None


def _closest_key(loc: tuple[Any, ...]) -> str | None:
    """Suggest the valid key nearest to the misspelt one at `loc` (pydantic's raw loc)."""
    if not loc:
        return None
    model: Any = RunConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if isinstance(model, dict):  # a tagged union: pydantic puts the tag in the loc
            model = model.get(part)
            continue
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None
        model = _inner(field.annotation)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    match = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return match[0] if match else None


def _shown_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop the union tags pydantic inserts after a list index (arms.0.plan.x -> arms.0.x)."""
    return tuple(p for i, p in enumerate(loc)
                 if not (p in _ARM_TAGS and i > 0 and isinstance(loc[i - 1], int)))


def _explain(err: ValidationError, source: str) -> PfreezeError:
    errors = err.errors()
    # A misspelt key also makes the real one "missing": report the typo, which explains both.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = _shown_loc(tuple(first["loc"]))
    path = ".".join(str(p) for p in loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        hint = _closest_key(tuple(first["loc"]))
        fix = f"did you mean '{hint}'?" if hint else "remove it (see configs/ for valid keys)"
        return PfreezeError(f"{source}: unknown config key '{path}'", fix)
    msg = first["msg"].removeprefix("Value error, ")
    return PfreezeError(f"{source}: invalid value for '{path}': {msg}", "correct it and rerun")


_ARM_TAGS = {"full", "plan", "lora", "schedule", "unfreeze", "lisa", "snr", "grad"}


def parse_override(item: str) -> tuple[list[str], Any]:
    """`training.learning_rate=3e-4` -> (["training", "learning_rate"], 3e-4)."""
    if "=" not in item:
        raise PfreezeError(f"--set '{item}' has no '='", "write --set key.path=value")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise PfreezeError(f"--set '{item}' has an empty key", "write --set key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _apply(tree: dict[str, Any], path: list[str], value: Any,
           defaults: dict[str, Any] | None = None) -> None:
    """Set `value` at `path`; a list the config does not spell out (arms) starts from its default,
    so `--set arms.1.select=...` edits the default arms instead of replacing them by a dict."""
    node: Any = tree
    dnode: Any = defaults
    for part in path[:-1]:
        if isinstance(node, list):
            i = int(part)
            node = node[i]
            dnode = None
        else:
            if part not in node:
                d = dnode.get(part) if isinstance(dnode, dict) else None
                node[part] = copy.deepcopy(d) if isinstance(d, list) else {}
            dnode = dnode.get(part) if isinstance(dnode, dict) else None
            node = node[part]
    if isinstance(node, list):
        node[int(path[-1])] = value
    else:
        node[path[-1]] = value


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> RunConfig:
    """Read YAML (or start from defaults), apply `--set` overrides, validate."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PfreezeError(f"config file {path} not found", "check the path") from None
        except (OSError, UnicodeDecodeError) as e:
            raise PfreezeError(f"cannot read config {path}: {e}", "check the file") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise PfreezeError(
                f"{path}: YAML syntax error{where}", "fix the indentation or quoting there"
            ) from None
        if not isinstance(tree, dict):
            raise PfreezeError(f"{path}: top level must be a mapping", "see configs/ examples")
    defaults = RunConfig().model_dump(mode="json") if overrides else None
    for item in overrides or []:
        keys, value = parse_override(item)
        try:
            _apply(tree, keys, value, defaults)
        except (ValueError, IndexError, TypeError, AttributeError, KeyError):
            raise PfreezeError(f"--set '{item}': no such place in the config",
                               "check the key path") from None
    if overrides:
        source = f"{source} + --set"
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise _explain(e, source) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_hash(cfg: RunConfig) -> str:
    """What a checkpoint belongs to: every setting but the folder the run sits in (a run may
    be resumed under another spelling of its path, and each repeat has its own)."""
    import hashlib

    text = yaml.safe_dump(cfg.model_dump(mode="json", exclude={"output_dir"}), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
