"""How a run executes: device, precision, compilation and CUDA graphs, the attention kernel of
training steps, the sampler for p. Most settings default to `auto`: `Runtime.resolve` decides
them once, from the settings, the model and the device; the result is immutable, recorded in
the summary and in every checkpoint, and a resumed run keeps it (`Runtime.resumed`).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from pfreeze.errors import PfreezeError
from pfreeze.measure.sampler import resolve as resolve_decoder
from pfreeze.measure.sampler import why_not
from pfreeze.run.attention import check_backend, resolve_backend
from pfreeze.settings import GenerationConfig, TrainingConfig


def pick_device(spec: str) -> torch.device:
    """The torch device of a training.device setting (auto: CUDA where there is one)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)  # the config has checked the spelling
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PfreezeError(f"device '{spec}' requested but no CUDA GPU is visible",
                           "use --set training.device=cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise PfreezeError(f"device '{spec}' requested but only {n} GPU(s) are visible",
                           f"use cuda:0 to cuda:{n - 1}, or auto")
    if device.type not in ("cpu", "cuda"):
        backend = getattr(torch, device.type, None)
        if backend is None or not backend.is_available():
            raise PfreezeError(f"device '{spec}' is not available in this torch build",
                               "use auto, cpu or cuda")
    return device


# Runs shorter than this stay eager under torch_compile=auto: compiling an arm costs tens of
# seconds on a cold inductor cache and is paid back only after several hundred steps
# (docs/BENCHMARKS.md, "Why the defaults are what they are").
COMPILE_PAYS_AFTER = 1000


def resolve_compile(setting: bool | str, device: torch.device, max_steps: int) -> bool:
    """auto: compile on a GPU for runs long enough to pay the compilation back, so a short run
    (the demo's 40 steps) is never slower than eager; never on the CPU, where inductor's C++
    compile takes minutes and gains little."""
    if setting != "auto":
        return bool(setting)
    return device.type == "cuda" and max_steps >= COMPILE_PAYS_AFTER


def resolve_compile_mode(mode: str, device: torch.device, accumulation: int) -> str:
    """auto: CUDA graphs on a GPU (no per-kernel launch cost; the gain is largest for short
    steps), except with gradient accumulation, whose micro-steps would share the graphs'
    outputs."""
    if mode != "auto":
        return mode
    return "reduce-overhead" if device.type == "cuda" and accumulation == 1 else "default"


def uses_graphs(compiled: bool, mode: str) -> bool:
    """Whether compiled steps run in CUDA graphs (max-autotune captures them as well)."""
    return compiled and mode in ("reduce-overhead", "max-autotune")


def release() -> None:
    """Drop compiled graphs, their CUDA-graph pools and the sampler's bf16 twin, so what runs
    next starts as a fresh process would (between repeats, between bench cases)."""
    from pfreeze.measure.generation import release_twin

    release_twin()
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check(t: TrainingConfig) -> torch.device:
    """Refuse settings that cannot run here before anything loads; the device they run on."""
    device = pick_device(t.device)
    bf16 = _bf16(t, device)
    check_backend(t.attention_backend, device, bf16, None, 0)
    compiled = resolve_compile(t.torch_compile, device, t.max_steps)
    mode = resolve_compile_mode(t.torch_compile_mode, device, t.gradient_accumulation_steps)
    if uses_graphs(compiled, mode) and t.gradient_accumulation_steps > 1:
        # CUDA-graph replays reuse output buffers: accumulated gradients would be wrong.
        raise PfreezeError(
            f"torch_compile_mode={mode} cannot be combined with gradient_accumulation_steps > 1",
            "use torch_compile_mode=default, or gradient_accumulation_steps=1",
        )
    return device


def _bf16(t: TrainingConfig, device: torch.device) -> bool:
    if t.bf16 == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return bool(t.bf16)


def _stored_below_fp32(t: TrainingConfig, model: nn.Module) -> bool:
    """A model stored in bf16 runs under bf16 autocast on any device (CPU included): fp32
    master weights sit beside bf16 frozen tensors, and only autocast multiplies the two."""
    low = next((p.dtype for p in model.parameters() if p.dtype != torch.float32), None)
    if low is not None and t.bf16 is False:
        raise PfreezeError(f"the model is stored in {str(low).removeprefix('torch.')}, but "
                           "training.bf16=false", "set training.bf16=auto, or model.dtype=float32")
    return low is not None


@dataclass(frozen=True)
class Runtime:
    """What `auto` resolved to for this run (and the explicit settings, checked)."""

    device: torch.device
    bf16: bool
    compiled: bool  # training steps run through torch.compile
    compile_mode: str  # default, reduce-overhead (CUDA graphs), max-autotune
    attention: str  # the training step's attention kernel: model, sdpa, flash, cudnn, ...
    decoder: str  # the sampler p is measured with: generate or pfreeze
    decoder_note: str = ""  # why auto chose generate (pfreeze's sampler cannot serve it here)

    @property
    def graphs(self) -> bool:
        """Whether compiled steps run in CUDA graphs."""
        return uses_graphs(self.compiled, self.compile_mode)

    @classmethod
    def resolve(cls, t: TrainingConfig, g: GenerationConfig, model: nn.Module,
                block: int, sharded: bool = False) -> Runtime:
        """Every auto setting against `model` on its device; `sharded`: the arms are FSDP2
        shards, which pfreeze's sampler cannot decode from (their forward gathers)."""
        device = check(t)
        bf16 = _bf16(t, device) or _stored_below_fp32(t, model)
        compiled = resolve_compile(t.torch_compile, device, t.max_steps)
        mode = resolve_compile_mode(t.torch_compile_mode, device, t.gradient_accumulation_steps)
        attention = resolve_backend(t.attention_backend, device, bf16, model, block,
                                    graphs=uses_graphs(compiled, mode))
        if sharded:
            if g.decoder == "pfreeze":
                raise PfreezeError("generation.decoder=pfreeze cannot sample from an arm sharded "
                                   "with FSDP2", "use generation.decoder=auto (or generate)")
            return cls(device, bf16, compiled, mode, attention, "generate",
                       "a sharded arm (FSDP2) samples with generate")
        decoder = resolve_decoder(g.decoder, model, g.top_k, device)
        note = (why_not(model, g.top_k, device) or "") if g.decoder == "auto" else ""
        return cls(device, bf16, compiled, mode, attention, decoder, note)

    @classmethod
    def without_model(cls, t: TrainingConfig, g: GenerationConfig) -> Runtime:
        """Before a model is there (a loop whose arms are built by hand): what needs no model
        is resolved; the attention kernel and the sampler are the models' own unless set."""
        device = check(t)
        attention = "model" if t.attention_backend == "auto" else t.attention_backend
        return cls(device, _bf16(t, device), resolve_compile(t.torch_compile, device, t.max_steps),
                   resolve_compile_mode(t.torch_compile_mode, device,
                                        t.gradient_accumulation_steps),
                   attention, "generate" if g.decoder == "auto" else g.decoder)

    def settings(self) -> dict[str, Any]:
        """What a checkpoint records (and a resume restores)."""
        return {"attention": self.attention, "decoder": self.decoder,
                "compile_mode": self.compile_mode, "compiled": self.compiled}

    def reported(self) -> dict[str, Any]:
        """What summary.json and the bench report."""
        return {**self.settings(), "compile_mode": self.compile_mode if self.compiled else None,
                "decoder_note": self.decoder_note or None}

    def resumed(self, saved: dict[str, Any], t: TrainingConfig, model: nn.Module, block: int,
                warn: Callable[[str], None]) -> Runtime:
        """The runtime a resumed run keeps: what `auto` resolved to when it started, even on
        another machine (the decoder sets which draws p is measured on, the attention kernel,
        compilation and graphs its step times), except what cannot run here."""
        attention = self.attention
        try:  # every backend computes the same attention: keep it if it can run here
            check_backend(saved["attention"], self.device, self.bf16, model, block)
            attention = saved["attention"]
        except PfreezeError as e:
            warn(f"resumed with attention {attention}, not {saved['attention']} as it "
                 f"started: {e.problem}")
        mode, compiled = saved["compile_mode"], saved["compiled"]
        if compiled and self.device.type != "cuda" and t.torch_compile == "auto":
            warn("resumed eager: the run compiled on a GPU, and compiling here (CPU) costs "
                 "minutes for little")
            compiled = False
        if compiled and uses_graphs(True, mode) and t.gradient_accumulation_steps > 1:
            # Graph replays share output buffers (refused at the start of a run); a config
            # changed for the resume through the Python API can get here.
            warn(f"resumed with torch_compile_mode=default, not {mode}: CUDA graphs cannot "
                 "run with gradient accumulation")
            mode = "default"
        note = self.decoder_note if saved["decoder"] == self.decoder else (
            "the sampler the run started with, kept by the resume")
        return replace(self, attention=attention, decoder=saved["decoder"], decoder_note=note,
                       compiled=compiled,
                       compile_mode=mode)
