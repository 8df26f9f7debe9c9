"""One optimizer step of one arm: forward and backward (compiled where the runtime says so),
masking, clipping, the optimizer, the frozen elements restored, ‖ΔW‖ queued; and the staging
of each step's token ids to the GPU.

Nothing here reads a device value back to the host: the loss, the norms and the CUDA events
are queued on the arm (`ArmRun.pending`) and read at the loop's next flush.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from pfreeze.measure.heldout import autocast
from pfreeze.plan.masks import check_audit
from pfreeze.run.arm_run import ArmRun, StepRecord
from pfreeze.run.attention import training_attention
from pfreeze.run.runtime import Runtime
from pfreeze.settings import TrainingConfig


class LossOf(nn.Module):
    """`module(**kwargs).loss` and nothing else: the training step's forward.

    Why not the model itself: a compiled model also returns its logits (B x T x V, 1.6 GB of
    bf16 at 32 x 512 with SmolLM2's 49k vocabulary). The step never uses them, so autograd
    hands the backward graph an all-zero gradient for them, which AOTAutograd materialises
    and the CUDA-graph runner copies into its static input, every step. With the loss the
    only output, that gradient does not exist (docs/BENCHMARKS.md has the cost it saves).
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
        # gradient would cross between the two graphs (for GPT-2, a padded copy of it in every
        # step). Naming the loss it uses anyway changes nothing else.
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
    memory anew, which dominated short steps (docs/BENCHMARKS.md). A buffer is refilled only
    once the copy that last read it has finished (`depth` transfers ago, normally long done:
    the wait also bounds how far the host runs ahead). On the CPU, tensors pass through
    unchanged.
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



def _timer(device: torch.device) -> Any:
    if device.type == "cuda":
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev
    return time.perf_counter()


def train_step(arm: ArmRun, step: int, batch: torch.Tensor, windows: torch.Tensor | None,
               idx: torch.Tensor | None, rt: Runtime, t: TrainingConfig,
               stage: Staging) -> float | None:
    """Step `step` (0-based) of `arm` on `batch`; the process's reserved GPU memory after it
    (MiB; None on the CPU). Chunk ids `windows` (host) and `idx` (device) come with epochs
    sampling; a host batch is staged here."""
    if step in arm.strategy.plans and step > 0:
        arm.freezer.apply(arm.strategy.plan_at(step))
        if arm.replicas is not None:  # DDP registers the trainable set it was built with
            arm.replicas.wrap(arm.step_model)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    start = _timer(rt.device)
    trainable = arm.freezer.trainable()
    total = _losses(arm, batch, windows, idx, rt, t, stage, bool(trainable))
    if trainable:
        arm.freezer.mask_grads()
        if t.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm, foreach=True)
        arm.optimizer.step()
        arm.optimizer.zero_grad(set_to_none=True)
        arm.freezer.restore()
    lr = arm.scheduler.get_last_lr()[0]  # the rate this step used (a host float: no sync)
    arm.scheduler.step()
    end = _timer(rt.device)
    mem = reserved = None
    if rt.device.type == "cuda":
        mem = torch.cuda.max_memory_allocated(rt.device) / 2**20
        # CUDA-graph pools are reserved once, not allocated in a step: the process's
        # reserved peak (all arms) is what bounds the batch, so it is kept too.
        reserved = torch.cuda.max_memory_reserved(rt.device) / 2**20
    dw, dw0 = arm.tracker.step()
    arm.pending.append(StepRecord(step + 1, total, dw, dw0, start, end, mem, lr,
                                   reserved))
    if t.integrity_steps and (step + 1) % t.integrity_steps == 0:
        check_audit(arm.strategy.name, arm.freezer.audit())
    return reserved


def _losses(arm: ArmRun, batch: torch.Tensor, windows: torch.Tensor | None,
            idx: torch.Tensor | None, rt: Runtime, t: TrainingConfig, stage: Staging,
            trainable: bool) -> torch.Tensor:
    """Forward and backward over the step's micro-batches; their mean loss, on the device."""
    total = torch.zeros((), device=rt.device)
    n = t.gradient_accumulation_steps
    cached = arm.prefix is not None
    if cached and windows is None:  # step_fn runs the upper blocks only: never guess
        raise ValueError(f"arm '{arm.strategy.name}' caches its prefix: pass the chunk ids")
    # The loop stages each step once for all arms; other callers may pass host tensors, or a
    # batch on the device without its chunk ids there.
    if batch.device.type != rt.device.type:
        batch, idx = stage(batch, windows if cached else None)
    elif cached and idx is None:
        (idx,) = stage(windows)
    micro = batch.chunk(n)
    # The cache checks its contents on the host ids and gathers with the device ones.
    wins = windows.chunk(n) if cached else [None] * len(micro)
    idxs = idx.chunk(n) if cached else [None] * len(micro)
    # Not `step_fn or ...`: truth-testing a compiled module falls through to len().
    loss_of = arm.step_fn if arm.step_fn is not None else LossOf(arm.step_model)
    replicas = arm.replicas
    if replicas is not None:  # data parallel: the wrapper all-reduces the last backward
        loss_of = LossOf(replicas.forward_module)
    for k, (x, w, i) in enumerate(zip(micro, wins, idxs, strict=True)):
        # The attention kernel is chosen in the forward; the backward follows it.
        with (autocast(rt.device, rt.bf16), torch.set_grad_enabled(trainable),
              training_attention(arm.model, rt.attention),
              replicas.accumulating(k == len(micro) - 1) if replicas is not None
              else nullcontext()):
            if cached:  # blocks f.. on block f's cached input
                h = arm.prefix.inputs(x, w, i)
                loss = loss_of(inputs_embeds=h, labels=x, use_cache=False) / len(micro)
            else:
                loss = loss_of(input_ids=x, labels=x, use_cache=False) / len(micro)
        if trainable:
            loss.backward()
        total += loss.detach()
    return total
