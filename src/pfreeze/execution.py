"""How a run executes: device, compilation and CUDA graphs, the attention kernel, the sampler
for p. Most settings default to `auto`; this module resolves what it can without a model (the
rest: attention.resolve_backend, sampler.resolve) and keeps a resumed run on what `auto`
resolved to when it started.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pfreeze.attention import check_backend
from pfreeze.errors import PfreezeError

if TYPE_CHECKING:
    from pfreeze.train import Loop


def pick_device(spec: str) -> torch.device:
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


# Runs shorter than this stay eager under torch_compile=auto. On an H200 compiling one arm
# costs 23-56 s on a cold inductor cache and saves 47-100 ms a step, so it pays back after
# 325-905 steps (SmolLM2 at 32 x 512 and 16 x 256, GPT-2 at 32 x 512; docs/BENCHMARKS.md,
# session 6).
COMPILE_PAYS_AFTER = 1000


def resolve_compile(setting: bool | str, device: torch.device, max_steps: int) -> bool:
    """auto: compile on a GPU for runs long enough to pay the compilation back, so a short run
    (the demo's 40 steps) is never slower than eager; never on the CPU, where inductor's C++
    compile takes minutes and gains little."""
    if setting != "auto":
        return bool(setting)
    return device.type == "cuda" and max_steps >= COMPILE_PAYS_AFTER


def resolve_compile_mode(mode: str, device: torch.device, accumulation: int) -> str:
    """auto: CUDA graphs on a GPU (on an H200 1.0-1.4x at 32 x 512, up to 3x at 16 x 256),
    except with gradient accumulation, whose micro-steps would share the graphs' outputs."""
    if mode != "auto":
        return mode
    return "reduce-overhead" if device.type == "cuda" and accumulation == 1 else "default"


def uses_graphs(compiled: bool, mode: str) -> bool:
    """Whether compiled steps run in CUDA graphs (max-autotune captures them as well)."""
    return compiled and mode in ("reduce-overhead", "max-autotune")


class LossOf(nn.Module):
    """`module(**kwargs).loss` and nothing else: the training step's forward.

    Why not the model itself: a compiled model also returns its logits (B x T x V, 1.6 GB of
    bf16 at 32 x 512 with SmolLM2's 49k vocabulary). The step never uses them, so autograd
    hands the backward graph an all-zero gradient for them, which AOTAutograd materialises
    and the CUDA-graph runner copies into its static input: about 1.2 ms of fills and copies
    in each 32 x 512 SmolLM2 step on an H200 (docs/BENCHMARKS.md, session 8). With the loss
    the only output, that gradient does not exist.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, **kwargs: Any) -> torch.Tensor:
        return self.module(**kwargs).loss


def step_module(module: nn.Module) -> LossOf:
    """What the training step compiles: the loss of `module`, traceable as one graph. Names
    the loss of the causal LM inside `module` in place where transformers left it unnamed."""
    from transformers import PreTrainedModel

    # The outermost transformers model computes the loss: `module` itself, or the model
    # inside a peft wrapper (an attribute set on the wrapper would not reach it).
    lm = next((m for m in module.modules() if isinstance(m, PreTrainedModel)), module)
    if getattr(lm, "loss_type", "") is None:
        # transformers names the loss after the model class; for a class it does not know
        # (GPT2LMHeadModel) it logs a warning and uses ForCausalLM's loss. Dynamo cannot trace
        # the logging call, so the loss would compile as a graph of its own and the logits'
        # gradient would cross between the two graphs (GPT-2: a 1.25 ms padded copy of it in
        # every step, session 8). Naming the loss it uses anyway changes nothing else.
        lm.loss_type = "ForCausalLM"
    return LossOf(module)


def compile_step(module: nn.Module, mode: str) -> Any:
    """The training step's compiled callable (static shapes: training windows never change)."""
    return torch.compile(step_module(module), dynamic=False,
                         mode=None if mode == "default" else mode)


class Staging:
    """Each step's token ids and chunk ids to the GPU in one copy, through a ring of pinned
    buffers.

    Why not `Tensor.pin_memory()` per step: the host runs steps ahead of the GPU, so the
    pinned blocks of earlier steps are still in flight and every step allocates page-locked
    memory anew; on an H200 that held a cached-prefix step at 16 x 256 to 12.3 ms, 7.1 ms
    with this ring (docs/BENCHMARKS.md, session 5). A buffer is refilled only once the copy
    that last read it has finished (`depth` transfers ago, normally long done: the wait also
    bounds how far the host runs ahead). On the CPU, tensors pass through unchanged.
    """

    def __init__(self, device: torch.device, depth: int = 8) -> None:
        self.device, self.depth, self.k = device, depth, 0
        self.slots: list[tuple[torch.Tensor, torch.cuda.Event]] = []

    def __call__(self, *host: torch.Tensor | None) -> list[torch.Tensor | None]:
        """The int64 host tensors `host` on the device, as views of one transfer (None stays
        None: a step without chunk ids)."""
        given = [t for t in host if t is not None]
        if any(t.device.type != "cpu" or t.dtype != torch.long for t in given):
            raise ValueError("Staging takes int64 tensors on the host")
        if self.device.type != "cuda":
            return [None if t is None else t.to(self.device) for t in host]
        n = sum(t.numel() for t in given)
        k, self.k = self.k, (self.k + 1) % self.depth
        if k == len(self.slots):
            self.slots.append((torch.empty(0, dtype=torch.long), torch.cuda.Event()))
        buf, done = self.slots[k]
        done.synchronize()  # the copy that last read this buffer (an unrecorded event: none)
        if buf.numel() < n:
            buf = torch.empty(n, dtype=torch.long, pin_memory=True)
            self.slots[k] = (buf, done)
        torch.cat([t.reshape(-1) for t in given], out=buf[:n])
        flat = buf[:n].to(self.device, non_blocking=True)
        # On the stream the copy was queued on: the target device's, which need not be the
        # current device (training.device=cuda:1).
        done.record(torch.cuda.current_stream(self.device))
        parts = iter(flat.split([t.numel() for t in given]))
        return [None if t is None else next(parts).view(t.shape) for t in host]


def reported(loop: Loop) -> dict[str, Any]:
    """What the auto settings resolved to, as summary.json and the bench report it."""
    return {**snapshot(loop), "compile_mode": loop.compile_mode if loop.compile else None}


def release() -> None:
    """Drop compiled graphs, their CUDA-graph pools and the sampler's bf16 twin, so what runs
    next starts as a fresh process would (between repeats, between bench cases)."""
    from pfreeze.evaluate import release_twin

    release_twin()
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def snapshot(loop: Loop) -> dict[str, Any]:
    return {"attention": loop.attention, "decoder": loop.decoder,
            "compile_mode": loop.compile_mode, "compiled": loop.compile}


def pin(loop: Loop, saved: dict[str, Any]) -> None:
    """A resumed run keeps what `auto` resolved to when it started, even on another machine:
    the decoder sets which draws p is measured on, the attention kernel, compilation and
    graphs its step times."""
    if saved == snapshot(loop):
        return
    loop.decoder = saved["decoder"]  # the one that decides what is measured: kept as it was
    try:  # every backend computes the same attention: keep it if it can run here
        check_backend(saved["attention"], loop.device, loop.bf16, loop.arms[0].model,
                      loop.cfg.data.block_size)
        loop.attention = saved["attention"]
    except PfreezeError as e:
        loop.warn(f"resumed with attention {loop.attention}, not {saved['attention']} as it "
                  f"started: {e.problem}")
    mode, compiled = saved["compile_mode"], saved["compiled"]
    if compiled and loop.device.type != "cuda" and loop.t.torch_compile == "auto":
        loop.warn("resumed eager: the run compiled on a GPU, and compiling here (CPU) costs "
                  "minutes for little")
        compiled = False
    if compiled and uses_graphs(True, mode) and loop.t.gradient_accumulation_steps > 1:
        # Graph replays share output buffers, so Loop refuses this at the start. The CLI's
        # --resume reuses the run's own config, which cannot get here; run(cfg, resume=True)
        # with a config that changed the accumulation can.
        loop.warn(f"resumed with torch_compile_mode=default, not {mode}: CUDA graphs cannot "
                  "run with gradient accumulation")
        mode = "default"
    if (mode, compiled) != (loop.compile_mode, loop.compile):
        loop.compile_mode, loop.compile = mode, compiled
        for arm in loop.arms:
            arm.step_fn = loop.compiled_step(arm)
