"""The settings schema of each part of a run: model, data, training, generation, and the base
of every arm kind's settings (each kind's own class lives with its strategy, in
pfreeze/run/arms/). The whole tree, its YAML loading and `--set` overrides: pfreeze.config.

Every model forbids unknown keys, so a typo is an error that names its path and the closest
valid key instead of a silently ignored setting. Training names follow transformers'
TrainingArguments so a practitioner can carry settings over unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    # `smollm2-135m` (embedded GGUF), an HF hub id, a local directory, or `random:<family>`.
    name: str = "smollm2-135m"
    revision: str | None = None
    # How the weights are stored. auto: the checkpoint's own dtype (its config's dtype);
    # float32 for random:<family> models and the embedded GGUF. Frozen tensors stay in it,
    # bit for bit; trained tensors follow training.master_weights.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"


class DataConfig(Strict):
    """`data:` the corpus and how it becomes training windows and held-out text."""

    # A text file, a folder of *.txt/*.md, a .jsonl/.json/.csv/.parquet file, a folder saved
    # by datasets' save_to_disk, `hf:<dataset id>`, or `gutenberg:<id>` (pfreeze.data.formats).
    corpus: str = "gutenberg:2701"
    encoding: str | None = None
    strip_gutenberg: bool = True
    # The field of each row that holds its text; rows without it but with `messages` are chats.
    text_field: str = "text"
    # A Jinja chat template (the text, or a file) for `messages` rows; None: the model's own.
    chat_template: str | None = None
    # Appended to every document but the last before tokenising (the stream's joints).
    document_separator: str = "\n\n"
    validation_fraction: float = Field(0.1, ge=0.0, le=0.5)
    # tail: the last tokens are held out. documents: the last whole documents, the share
    # nearest validation_fraction.
    validation_split: Literal["tail", "documents"] = "tail"
    # Keep the token ids by content fingerprint (pfreeze.data.tokens); auto: corpora of a
    # million characters or more.
    token_cache: bool | Literal["auto"] = "auto"
    block_size: int = Field(256, ge=8, description="tokens per training window")
    top_k: int = Field(100, ge=1, description="size of the frequent-token set S_k for p")
    # random: windows start anywhere. epochs: aligned chunks, reshuffled every epoch; chunks
    # recur, so an arm frozen below block f can reuse block f's cached input (prefix_cache).
    sampling: Literal["random", "epochs"] = "random"
    # The forgetting probe: general text the run never trains on, its loss measured at every
    # evaluation (pfreeze.measure.probe). builtin:us-documents (installed with pfreeze), a text
    # file, gutenberg:<id>, or none.
    probe_corpus: str = "builtin:us-documents"


class TrainingConfig(Strict):
    """`training:` optimizer, schedule, steps, evaluation, checkpoints and execution."""

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
    # Trained tensors of a model stored in bf16: fp32 copies (master weights, fp32 gradients
    # and optimizer state), or trained in the storage dtype itself. Frozen tensors are never
    # copied either way.
    master_weights: Literal["fp32", "storage"] = "fp32"
    # Recompute each block's activations in the backward (non-reentrant), from the lowest
    # trained block up: less memory, about one more forward per step.
    gradient_checkpointing: bool = False
    logging_steps: int = Field(10, ge=1, description="how often the host reads device metrics")
    # Where metrics go besides metrics.jsonl, which is always written (pfreeze.outputs.trackers;
    # each tracker's package is the extra pfreeze[trackers]).
    report_to: list[Literal["jsonl", "tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=lambda: ["jsonl"])
    run_name: str | None = Field(None, description="the trackers' run name (None: the "
                                 "output directory's name)")
    eval_steps: int = Field(10, ge=1)
    eval_batches: int = Field(4, ge=1, description="held-out batches per evaluation")
    save_steps: int = Field(0, ge=0, description="checkpoint every N steps (0: never)")
    # Stop an arm after this many evaluations without a better held-out loss (None: never).
    early_stopping_patience: int | None = Field(None, ge=1)
    keep_best: bool = Field(False, description="save each arm's tensors at its best eval")
    integrity_steps: int = Field(0, ge=0,
                                 description="audit frozen elements every N steps (0: end)")
    device: str = "auto"  # auto, cpu, cuda, cuda:N (mps, xpu where torch has them)
    # Several ranks per arm (torchrun): true (YAML's `on` too) shards each arm over its ranks
    # with FSDP2, false keeps a whole copy per rank (DDP), auto shards where the memory plan
    # says one device is short.
    fsdp: bool | Literal["auto"] = "auto"
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
    # mask (pfreeze.run.attention); sdpa: the same path, SDPA picks the kernel. auto: sdpa on a
    # GPU with bf16 and CUDA graphs where it computes the same attention, else model.
    # Evaluation and sampling keep the model's own attention.
    attention_backend: Literal["auto", "model", "flash", "sdpa", "cudnn", "efficient",
                               "math"] = "auto"

    @field_validator("report_to", mode="before")
    @classmethod
    def _a_list(cls, v: Any) -> Any:
        if isinstance(v, str):  # TrainingArguments takes one name too; "none": jsonl alone
            return [] if v == "none" else [v]
        return v

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


class GenerationConfig(Strict):
    """`generation:` the prompts sampled before and after training (behind p)."""

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
    # generate: transformers' generate(). pfreeze: pfreeze.measure.sampler, the decode step as one
    # graph (CUDA graphs on a GPU), no per-token host work; the model_types the families list as
    # sampler_model_types (all but GPT-Neo; not ALiBi Falcon); needs top_k.
    # auto: pfreeze on a GPU where it can serve the model, else generate.
    decoder: Literal["auto", "generate", "pfreeze"] = "auto"


_ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class ArmConfig(Strict):
    """What every arm kind's config has; each kind adds `kind: Literal["<kind>"]` and its own
    fields, in its module under pfreeze/run/arms/."""

    kind: str
    # Becomes a folder name (arms/<name>/) and a label in tables: no separators or spaces.
    name: str | None = None

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        if v is not None and not _ARM_NAME.fullmatch(v):
            raise ValueError(f"arm name {v!r} must be letters, digits, '.', '_' or '-' "
                             "(it names the folder arms/<name>/)")
        return v



class RunSpec(Protocol):
    """What a run reads of its settings tree (pfreeze.config.RunConfig is one); the run's
    layers take this rather than the config module, which sits above them."""

    model: ModelConfig
    data: DataConfig
    training: TrainingConfig
    generation: GenerationConfig
    arms: Sequence[ArmConfig]
    arms_placement: str
    track: str
    output_dir: str
    save_pretrained: bool
    repeats: int

    def model_dump(self, **kwargs: Any) -> dict[str, Any]: ...

    def model_copy(self, **kwargs: Any) -> RunSpec: ...


def dump(model: BaseModel) -> str:
    """YAML of a settings tree, in field order (what config.yaml holds)."""
    return yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False)


def digest(model: BaseModel, exclude: set[str] | None = None) -> str:
    """sha256 of a settings tree's values (key order independent)."""
    import hashlib

    text = yaml.safe_dump(model.model_dump(mode="json", exclude=exclude), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
