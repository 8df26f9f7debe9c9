"""The run configuration: one pydantic tree, loaded from YAML, overridable with `--set`.

Every model forbids unknown keys, so a typo is an error that names its path and the closest
valid key instead of a silently ignored setting. Training names follow transformers'
TrainingArguments so a practitioner can carry settings over unchanged.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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


class TrainingConfig(_Strict):
    learning_rate: float = Field(1e-4, gt=0)
    per_device_train_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_steps: int = Field(40, ge=1)
    warmup_steps: int = Field(0, ge=0)
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
    integrity_steps: int = Field(0, ge=0, description="audit frozen elements every N steps (0: end)")
    device: str = "auto"
    # auto: compile on a GPU when max_steps >= 200 (warm-up is paid back); never on CPU.
    torch_compile: bool | Literal["auto"] = "auto"


class GenerationConfig(_Strict):
    # The same prompts and seeds are used for every arm, before and after training.
    prompts: list[str] = Field(
        default_factory=lambda: ["Call me", "The whale", "It was a", "Upon the deck"]
    )
    samples_per_prompt: int = Field(2, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(50, ge=1)
    seed: int = 1234


class _ArmBase(_Strict):
    name: str | None = None


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


Arm = Annotated[FullArm | PlanArm | LoraArm | ScheduleArm, Field(discriminator="kind")]


class RunConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    arms: list[Arm] = Field(default_factory=lambda: [FullArm(), PlanArm()], min_length=1)
    # Which matrices get per-step ‖ΔW‖ (selector language; tracked in every arm).
    track: str = "roles=q,k,v,o"
    output_dir: str = "runs/latest"
    save_pretrained: bool = False

    @model_validator(mode="after")
    def _unique_arm_names(self) -> RunConfig:
        seen: set[str] = set()
        for arm in self.arms:
            if arm.name is None:
                arm.name = arm.kind if arm.kind not in seen else f"{arm.kind}{len(seen)}"
            if arm.name in seen:
                raise ValueError(f"two arms are named {arm.name!r}; give each arm a unique name")
            seen.add(arm.name)
        return self


# --------------------------------------------------------------------------- loading


def _closest_key(loc: tuple[Any, ...]) -> str | None:
    """Suggest the valid key nearest to the misspelt one at `loc`."""
    model: Any = RunConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return None
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return None
    names = list(model.model_fields) if model is not None else []
    match = difflib.get_close_matches(str(loc[-1]), names, n=1)
    return match[0] if match else None


def _explain(err: ValidationError, source: str) -> PfreezeError:
    first = err.errors()[0]
    loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and p in _ARM_TAGS))
    path = ".".join(str(p) for p in loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        hint = _closest_key(loc)
        fix = f"did you mean '{hint}'?" if hint else "remove it (see configs/ for valid keys)"
        return PfreezeError(f"{source}: unknown config key '{path}'", fix)
    msg = first["msg"].removeprefix("Value error, ")
    return PfreezeError(f"{source}: invalid value for '{path}': {msg}", "correct it and rerun")


_ARM_TAGS = {"full", "plan", "lora", "schedule"}


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


def _apply(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node: Any = tree
    for part in path[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
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
    for item in overrides or []:
        keys, value = parse_override(item)
        try:
            _apply(tree, keys, value)
        except (ValueError, IndexError, TypeError, AttributeError):
            raise PfreezeError(f"--set '{item}': no such place in the config", "check the key path") from None
        source = f"{source} + --set"
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise _explain(e, source) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
