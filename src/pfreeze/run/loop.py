"""The training loop: every arm, one identical batch stream.

    setup        load θ₀ once, copy it into each arm, prove the copies equal (hash), resolve
                 the runtime (device, compile, attention kernel, sampler) once
    train_step   one optimizer step of one arm (pfreeze.run.step)
    flush        read the queued device values of every arm, append them to metrics.jsonl

The phases of a whole run (measurements before and after, checkpoints, interrupts, outputs)
are pfreeze.run.session's; a benchmark builds a Loop alone and steps its arms.

Hot-path rule: nothing in the step reads a device value back to the host. Losses, ‖ΔW‖ norms
and CUDA timing events are queued on the device and read every `logging_steps`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from pfreeze import __version__
from pfreeze.data.corpus import BatchStream, CorpusStats, describe
from pfreeze.data.formats import read_documents
from pfreeze.data.tokens import tokenize_documents
from pfreeze.errors import PfreezeError
from pfreeze.measure.drift import Tracker
from pfreeze.measure.heldout import fixed_windows
from pfreeze.measure.probe import Probe, build_probe
from pfreeze.models.families import describe_params
from pfreeze.models.load import LoadedModel, check_positions, count_params, load_model, state_hash
from pfreeze.outputs.files import RunFiles, environment
from pfreeze.plan.masks import Freezer, promote
from pfreeze.plan.memory import MemoryPlan
from pfreeze.plan.selectors import compile_plan
from pfreeze.run import activations, distributed, fit, sharding
from pfreeze.run import step as steps
from pfreeze.run.arm_run import ArmRun, build_optimizer
from pfreeze.run.arms import ArmStrategy, make_arm
from pfreeze.run.gathered import GatheredFiles
from pfreeze.run.moments import Moments
from pfreeze.run.prefix import Caches, PrefixCache
from pfreeze.run.ranks import AcrossRanks
from pfreeze.run.runtime import Runtime, release
from pfreeze.run.sharding import LocalView, Replicas, ShardFreezer
from pfreeze.run.shared import SharedTheta0
from pfreeze.settings import ArmConfig, RunSpec

# The phases of a run as they begin (loading, building each arm, ...): the CLI shows them on
# its progress line, since an 8B model spends minutes before its first step.
log = logging.getLogger("pfreeze.run")


class Loop(AcrossRanks):
    """Every arm of one run, built from θ₀ and stepped on one batch stream (the phases of a
    whole run: pfreeze.run.session)."""

    def __init__(self, cfg: RunSpec, files: RunFiles | None = None,
                 on_step: Callable[[int, dict[str, float]], None] | None = None) -> None:
        """`files` None: a loop built only to step arms (build_arms, train_step), as the
        benchmark does; it writes no files, and run() needs them."""
        self.cfg, self.files, self.on_step = cfg, files, on_step
        # Under torchrun: this rank's place, and which ranks run which arm (a plain process
        # is a world of one that runs every arm).
        if cfg.arms_placement == "sequential":
            distributed.single_process_only("arms_placement=sequential",
                                            "set arms_placement=auto (arms spread over ranks)")
        self.world = distributed.init_world(cfg.training.device)
        self.dist = distributed.place(self.world, len(cfg.arms))
        # The arms this process holds, by their index in the config (sequential: the arm
        # whose turn it is, none between turns).
        self.mine = self.dist.mine
        if files is not None and self.world.distributed:
            self.files = GatheredFiles(files, self.dist, [str(a.name) for a in cfg.arms],
                                       lambda: all(a.stopped for a in self.arms))
        self.caches: Caches | None = None  # the frozen-prefix caches, made with the first arm
        self.stream: BatchStream | None = None  # set by setup() (or by a benchmark)
        self.t = cfg.training
        # Settings that cannot run here fail now, before any loading; build_arms resolves the
        # rest against the model.
        self.rt = Runtime.without_model(self.t, cfg.generation)
        self.device = self.rt.device
        self.moments: Moments | None = None  # the measurements (setup)
        self.memory: MemoryPlan | None = None  # what the arms need, by plan (setup)
        self.placement = "together"  # or sequential: one arm on the device at a time (setup)
        self.kept_placement: str | None = None  # a resume's: the placement it was saved in
        self.theta0: tuple | None = None  # (θ₀, family, its params, tracked names): builds arms
        self.stage = steps.Staging(self.device)  # host ids -> device, once per step
        self.reserved_mb = 0.0  # GPU memory reserved by this process (all arms), at its peak
        self.compiled_once: set[str] = set()  # arms whose compiled step has run here
        self.sharded = False  # this rank's arm sharded with FSDP2 (setup)
        self.theta0_hash: str | None = None  # set by setup (a benchmark's loop skips it)
        self.shared_mib = 0.0  # their bytes on the device

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        # Before anything loads: stop here if the arms cannot fit on the device (together,
        # or one at a time where arms_placement allows).
        self.memory = fit.memory_plan(cfg, self.device, self.rt.bf16)
        # What has to fit on this rank's device: its own arms (all of them in one process).
        here = replace(self.memory, arms=[self.memory.arms[i] for i in self.mine])
        self.sharded = sharding.wants_fsdp(self.t.fsdp, self.dist.mode, here.fits)
        if self.sharded:  # each rank holds a shard of its arm: no one-device stop
            sharding.check_fsdp(self.t)
        # A resumed run keeps its placement: its checkpoint holds the arms laid out that way.
        self.placement = "together" if self.sharded else fit.placement(
            here, self.kept_placement or cfg.arms_placement)
        if self.placement == "sequential":  # auto's choice, or a resumed sequential run's
            distributed.single_process_only("arms_placement=sequential",
                                            "set arms_placement=auto (arms spread over ranks)")
        docs = read_documents(cfg.data)  # before the model: a bad corpus fails fast
        log.info("loading %s", cfg.model.name)
        self.lm: LoadedModel = load_model(cfg.model.name, cfg.model.revision, seed=self.t.seed,
                                               dtype=cfg.model.dtype)
        check_positions(self.lm, cfg.data.block_size, cfg.generation)
        self.stats: CorpusStats = tokenize_documents(docs, self.lm.tokenizer, cfg.data,
                                                     min_tokens=cfg.data.block_size)
        self.corpus = {"source": docs.source, **describe(self.stats, self.lm.tokenizer.decode)}
        self.stream = self.new_stream()
        n_eval = self.t.eval_batches * self.t.per_device_train_batch_size
        self.val_windows = fixed_windows(self.stats.val_ids, cfg.data.block_size, n_eval)
        self.train_windows = fixed_windows(self.stats.train_ids, cfg.data.block_size, n_eval)
        self.probe: Probe | None = build_probe(cfg.data.probe_corpus, self.lm.tokenizer,
                                               cfg.data.block_size, n_eval, cfg.data.encoding)
        log.info("hashing θ₀")
        self.theta0_hash = state_hash(self.lm.model)
        distributed.same_everywhere(self.world, self.theta0_hash, "the θ₀ hash")
        # Adapter initialisation and any dropout draw from the global generator: seed it.
        torch.manual_seed(self.t.seed)
        if self.placement == "sequential":  # θ₀ stays on the host; arms are built in turn
            self.build_arms(self.lm.model, self.lm.family, [])
            self.mine = []
        else:
            mine = None if len(self.mine) == len(cfg.arms) else self.mine
            self.build_arms(self.lm.model, self.lm.family, mine)
            self.theta0 = None
            del self.lm.model  # each arm holds its own copy now
        self.moments = Moments(self.arms, self.rt, self.val_windows, self.train_windows,
                               self.t, cfg.generation, self.lm.tokenizer, self.stats.top_set,
                               self.files, self.probe.windows if self.probe else None)

    def new_stream(self) -> BatchStream:
        """The run's batch stream from its start (every arm sees the same batches)."""
        # With data parallel arms, each replica takes its share of the step's windows.
        batch = (self.t.per_device_train_batch_size * self.t.gradient_accumulation_steps
                 * self.dist.replicas)
        return BatchStream(self.stats.train_ids, self.cfg.data.block_size, batch, self.t.seed,
                           self.cfg.data.sampling)

    def build_arms(self, base: nn.Module, family: str, which: list[int] | None = None) -> None:
        """Copy θ₀ into every arm (or the arms `which`), apply its first plan, build its
        optimizer and tracker."""
        self.rt = Runtime.resolve(self.t, self.cfg.generation, base, self.cfg.data.block_size,
                                  self.sharded)
        infos = describe_params(base, family)
        self.base_info = {"n_layers": base.config.num_hidden_layers,
                          "total_params": count_params(base),
                          "tied_embeddings": any(i.tied for i in infos.values())}
        tracked = list(compile_plan(base, family, self.cfg.track).tensors)
        self.theta0 = (base, family, infos, tracked)
        arms = self.cfg.arms if which is None else [self.cfg.arms[i] for i in which]
        # θ₀'s frozen tensors, once for all arms (the arms hold the device copies after)
        shared = (SharedTheta0(base, self.device)
                  if self.placement == "together" and self.dist.mode != "replicas" else None)
        self.arms = [self._build(acfg, shared) for acfg in arms]
        if shared is not None:
            self.shared_mib = shared.mib
        if which is None and self.t.prefix_cache is True and not any(a.prefix for a in self.arms):
            why = "; ".join(f"{a.strategy.name}: {a.prefix_note}" for a in self.arms)
            raise PfreezeError(f"training.prefix_cache=true, but no arm can use it ({why})",
                               "set training.prefix_cache=auto (or false)")

    def turn(self, i: int) -> ArmRun:
        """arms_placement=sequential: arm `i` alone on the device, on the stream from its
        start (setup, or the last turn's leave(), gave back its memory and left a fresh
        stream)."""
        assert not self.arms, "turn() after leave()"
        torch.manual_seed(self.t.seed)
        self.arms.append(self._build(self.cfg.arms[i]))
        self.mine = [i]
        return self.arms[0]

    def leave(self) -> None:
        """arms_placement=sequential: the arm of the last turn leaves the device (its memory
        given back), and the batch stream starts again."""
        self.arms, self.mine = [], []
        if self.moments is not None:
            self.moments.arms = self.arms
        release()
        self.caches, self.stream, self.batch_hashes = None, self.new_stream(), []

    def _build(self, acfg: ArmConfig, shared: SharedTheta0 | None = None) -> ArmRun:
        from transformers import get_scheduler

        base, family, infos, tracked = self.theta0
        strat = make_arm(acfg, family, self.t.max_steps, self.calibration_batches)
        log.info("building arm %s", strat.name)
        model = strat.build(base)
        # Hash each copy where it was made (host memory): the proof that all arms share θ₀.
        h = getattr(strat, "theta0_hash", None) or state_hash(model)
        known = {}  # what it never trains: θ₀'s one device copy, its digests known
        if shared is not None:
            known = shared.alias(model, strat.origin, strat.trained_names(),
                                 check=h != self.theta0_hash)
        strat.origin = {}  # ids of live objects only: never read again
        model = model.to(self.device).train()
        if self.t.master_weights == "fp32":  # frozen tensors keep their storage dtype
            promote(model, strat.trained_names())
        if self.t.gradient_checkpointing:
            activations.enable(model, activations.lowest_trained_block(
                strat.trained_names(), family))
        replicas = self._replicas(acfg, model)  # shards the model where FSDP2 is on
        sharded = replicas is not None and replicas.sharded
        freezer = (ShardFreezer(model, group=replicas.group) if sharded
                   else Freezer(model, known))
        freezer.apply(strat.first_plan())
        # Every tensor that trains at some step is registered now: flipping requires_grad
        # later does nothing for a tensor the optimizer has never seen.
        ever = [p for n, p in freezer.params.items() if n in strat.trained_names()]
        opt = build_optimizer(ever, self.t, self.device)
        sched = get_scheduler(self.t.lr_scheduler_type, opt,
                              num_warmup_steps=self.t.warmup_steps,
                              num_training_steps=self.t.max_steps,
                              scheduler_specific_kwargs=self.t.lr_scheduler_kwargs or None)
        tracker = Tracker(LocalView(model) if sharded else model, infos,
                          tracked if strat.tracks_base_weights else [],
                          trained=strat.trained_names())
        if sharded:
            sharding.check_tracker(tracker, strat.name)
        prefix, note = (None, "off: the arm is sharded (FSDP2)") if sharded else \
            self._prefix_cache(model, family, strat, infos)
        arm = ArmRun(strat, model, freezer, opt, sched, tracker, h, None, prefix, note)
        if replicas is not None:
            arm.replicas = replicas
            replicas.wrap(arm.step_model)
        arm.step_fn = self.compiled_step(arm)
        return arm

    def _replicas(self, acfg: ArmConfig, model: nn.Module) -> Replicas | None:
        """This rank's place in the arm's data-parallel group (None: the arm is whole here);
        with FSDP2 the model is sharded over the group now."""
        if self.dist.mode != "replicas":
            return None
        i = next(k for k, a in enumerate(self.cfg.arms) if a is acfg)
        replicas = Replicas(self.dist.group_of(i), self.dist.ranks[i], self.world.rank,
                            self.sharded)
        if self.sharded:
            replicas.shard(model)
        return replicas

    def _prefix_cache(self, model: nn.Module, family: str, strat: ArmStrategy,
                      infos: dict) -> tuple[PrefixCache | None, str]:
        stream = self.stream
        if not self.t.prefix_cache:
            return None, "off (training.prefix_cache=false)"
        if stream is None or stream.sampling != "epochs":
            return None, "off: windows never repeat with data.sampling=random"
        if self.caches is None:
            self.caches = Caches(stream.n_chunks, stream.block, self.device)
        return self.caches.for_arm(model, family, strat.trained_names(), infos,
                                   strat.single_plan)

    def compiled_step(self, arm: ArmRun) -> Any:
        """The arm's compiled training callable, or None: eager. It returns the loss tensor
        only (step.LossOf) of the model, or of a cached arm's upper blocks. Training
        only: evaluation and generate() use the eager module, whose changing shapes would
        otherwise exhaust dynamo's recompile limit and silently send training back to eager.
        Dynamo guards on requires_grad: an arm whose plan changes would recompile at each
        change and fall back to eager after 8, so only single-plan arms compile."""
        if not (self.rt.compiled and arm.strategy.single_plan) or arm.replicas is not None:
            return None
        return steps.compile_step(arm.step_model, self.rt.compile_mode)

    def set_runtime(self, rt: Runtime) -> None:
        """Run on `rt` from now on (a resume keeps the runtime the run started with)."""
        recompile = (rt.compiled, rt.compile_mode) != (self.rt.compiled, self.rt.compile_mode)
        self.rt = rt
        if self.moments is not None:
            self.moments.rt = rt
        if recompile:
            for arm in self.arms:
                arm.step_fn = self.compiled_step(arm)

    def calibration_batches(self, n: int) -> list[torch.Tensor]:
        """Batches for data-driven selection, from their own seeded stream (not the shared one)."""
        stream = BatchStream(self.stats.train_ids, self.stream.block,
                             self.t.per_device_train_batch_size, self.t.seed + 7919)
        return [stream.next() for _ in range(n)]

    # ------------------------------------------------------------------ steps
    def train_step(self, arm: ArmRun, step: int, batch: torch.Tensor,
                   windows: torch.Tensor | None = None, idx: torch.Tensor | None = None) -> None:
        """One optimizer step of `arm` on `batch` (chunk ids `windows` with epochs sampling,
        on the host; `idx`: the same on the device, where the caller staged them with the
        batch). A host batch is staged here. A data-parallel arm takes its share of them."""
        if arm.replicas is not None:
            batch, windows, idx = arm.replicas.part(batch, windows, idx)
        if arm.step_fn is not None and arm.strategy.name not in self.compiled_once:
            log.info("compiling arm %s's step", arm.strategy.name)  # minutes at 8B
            self.compiled_once.add(arm.strategy.name)
        reserved = steps.train_step(arm, step, batch, windows, idx, self.rt, self.t, self.stage)
        if reserved is not None:
            self.reserved_mb = max(self.reserved_mb, reserved)

    def guarded_step(self, arm: ArmRun, step: int, batch: torch.Tensor,
                      windows: torch.Tensor | None, idx: torch.Tensor | None) -> None:
        try:
            self.train_step(arm, step, batch, windows, idx)
        except torch.OutOfMemoryError:
            raise PfreezeError(
                f"out of memory in arm '{arm.strategy.name}' at step {step + 1} "
                f"(batch {self.t.per_device_train_batch_size} x {self.stream.block} tokens)",
                "lower training.per_device_train_batch_size (raise gradient_accumulation_steps "
                "to keep the effective batch) or data.block_size; CUDA graphs reserve memory "
                "of their own: training.torch_compile_mode=default frees it",
            ) from None

    def warn(self, message: str) -> None:
        print(f"warning: {message}", file=sys.stderr)

    def flush(self) -> dict[str, float]:
        """Read queued device values (one sync) and append them to metrics.jsonl."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        rows, last = [], {}
        tokens = self.stream.batch * self.stream.block
        for arm in self.arms:
            if arm.replicas is not None:  # the loss over every replica's share
                arm.replicas.settle(arm.pending)
            for rec in arm.pending:
                step, mem, secs, lv = rec.step, rec.mem_mb, rec.seconds(), float(rec.loss)
                if not math.isfinite(lv) and not arm.diverged:
                    arm.stopped, arm.diverged = f"loss became {lv} at step {step}", True
                    self.warn(f"arm '{arm.strategy.name}' stopped: {arm.stopped}; the other "
                              "arms go on (lower learning_rate or set max_grad_norm)")
                arm.losses.append(lv)
                arm.times.append(secs)
                keys = arm.tracker.keys
                rows.append({"kind": "train", "step": step, "arm": arm.strategy.name,
                             "loss": lv if math.isfinite(lv) else None,  # JSON has no NaN
                             "lr": rec.lr, "step_time_s": secs,
                             "tokens_per_s": tokens / secs if secs > 0 else None,
                             "batch_hash": self.batch_hashes[step - 1], "mem_mb": mem,
                             "dw": dict(zip(keys, rec.dw.tolist(), strict=True)),
                             "dw0": dict(zip(keys, rec.dw0.tolist(), strict=True))})
                last[arm.strategy.name] = lv
                arm.note_memory(rec)
            arm.pending.clear()
        self.files.append_metrics(rows)
        return {**last, **getattr(self.files, "last", {})}  # rank 0 of several: every arm's

    def summary(self, command: str | None, wall: float | None, arms: dict[str, dict[str, Any]],
                status: str = "finished") -> dict[str, Any]:
        """The run's summary.json around the arms' summaries `arms`."""
        return {
            "pfreeze_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": command, "status": status,
            "environment": {**environment(self.rt.device), "bf16": self.rt.bf16},
            # What the auto settings resolved to on this device. Per arm, peak_mem_mb is the
            # most any of its steps allocated and peak_reserved_mb the most the process held
            # reserved during one; gpu_reserved_peak_mb is the run's, all arms together (after
            # a resume, the larger of the two processes' peaks).
            "execution": {**self.rt.reported(), "gpu_reserved_peak_mb": self.reserved_mb or None,
                          "arms_placement": self.placement,
                          # θ₀'s tensors that some arm never trains, held once for all arms
                          "frozen_shared_mib": round(self.shared_mib, 1)},
            "model": {"name": self.lm.name, "architecture": self.lm.family, **self.base_info},
            "config": self.cfg.model_dump(mode="json"),
            "corpus": self.corpus,
            "probe": self.probe.info() if getattr(self, "probe", None) else None,
            "theta0_hash": self.theta0_hash,
            "distribution": self.distribution(),
            "memory_plan": self.memory.summary() if self.memory else None,
            # Identical θ₀ hashes mean identical models: the before-measurements ran once.
            "before_measured_once": (self.placement == "together"
                                     and self.moments.shared_theta0(0)),
            "wall_time_s": wall,
            "arms": arms,
        }
