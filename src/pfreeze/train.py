"""The training loop: every arm, one identical batch stream, one loop.

    setup    load θ₀ once, copy it into each arm, prove the copies equal (hash)
    before   held-out loss and generated-text share p of every arm (moments.py)
    train    for each step: draw one batch, give it to every arm in turn
    after    the same evaluations, the integrity audit, the trained tensors, the summary
             (summary.py)

Hot-path rule: nothing in the step reads a device value back to the host. Losses, ‖ΔW‖ norms
and CUDA timing events are queued on the device and read every `logging_steps`.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pfreeze import execution
from pfreeze.architectures import describe_params
from pfreeze.arms import ArmRun, ArmStrategy, StepRecord, build_optimizer, make_arm
from pfreeze.attention import check_backend, resolve_backend, training_attention
from pfreeze.config import RunConfig, dump_config
from pfreeze.corpus import (
    BatchStream,
    CorpusStats,
    describe,
    read_corpus,
    strip_gutenberg,
    tokenize_corpus,
)
from pfreeze.errors import PfreezeError
from pfreeze.evaluate import autocast, fixed_windows, release_twin
from pfreeze.interrupts import Interrupted, Signals
from pfreeze.masking import Freezer, Tracker, check_audit
from pfreeze.models import LoadedModel, check_positions, count_params, load_model, state_hash
from pfreeze.moments import evaluate_arms, sample_arms, sample_best
from pfreeze.outputs import NoSpace, RunFiles, finished, is_no_space
from pfreeze.plan import compile_plan
from pfreeze.prefix import Caches, PrefixCache
from pfreeze.sampler import resolve as resolve_decoder
from pfreeze.summary import arm_summary, run_summary


class Loop:
    """One run of the paired experiment; `run()` does it all, the parts are testable."""

    def __init__(self, cfg: RunConfig, files: RunFiles | None = None,
                 on_step: Callable[[int, dict[str, float]], None] | None = None) -> None:
        """`files` None: a loop built only to step arms (build_arms, train_step), as the
        benchmark does; it writes no files, and run() needs them."""
        self.cfg, self.files, self.on_step = cfg, files, on_step
        self.command: str | None = None
        self.before_start: Callable[[], None] | None = None  # a repeat's parent directory
        self.caches: Caches | None = None  # the frozen-prefix caches, made with the first arm
        self.stream: BatchStream | None = None  # set by setup() (or by a benchmark)
        self.t = cfg.training
        self.device = execution.pick_device(self.t.device)
        self.stage = execution.Staging(self.device)  # host ids -> device, once per step
        self.bf16 = (self.device.type == "cuda" and torch.cuda.is_bf16_supported()
                     if self.t.bf16 == "auto" else bool(self.t.bf16))
        self.compile = execution.resolve_compile(self.t.torch_compile, self.device,
                                                 self.t.max_steps)
        check_backend(self.t.attention_backend, self.device, self.bf16, None, 0)
        # Both resolved against the model: attention in build_arms, decoder in setup (until
        # then auto means the model's own attention, as for arms built by hand in tests).
        self.attention = "model" if self.t.attention_backend == "auto" else self.t.attention_backend
        self.decoder = cfg.generation.decoder
        self.reserved_mb = 0.0  # GPU memory reserved by this process (all arms), at its peak
        self.compile_mode = execution.resolve_compile_mode(self.t.torch_compile_mode, self.device,
                                                 self.t.gradient_accumulation_steps)
        if self.graphs and self.t.gradient_accumulation_steps > 1:
            # CUDA-graph replays reuse output buffers: accumulated gradients would be wrong.
            raise PfreezeError(
                f"torch_compile_mode={self.compile_mode} cannot be combined with "
                "gradient_accumulation_steps > 1",
                "use torch_compile_mode=default, or gradient_accumulation_steps=1",
            )

    @property
    def graphs(self) -> bool:
        """Whether compiled steps run in CUDA graphs (derived: a resume may pin the mode)."""
        return execution.uses_graphs(self.compile, self.compile_mode)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        text, source = read_corpus(cfg.data.corpus, cfg.data.encoding)
        if cfg.data.strip_gutenberg:
            text = strip_gutenberg(text)
        self.lm: LoadedModel = load_model(cfg.model.name, cfg.model.revision, seed=self.t.seed)
        check_positions(self.lm, cfg.data.block_size, cfg.generation)
        # An impossible decoder is refused now, not after the first evaluation.
        self.decoder = resolve_decoder(cfg.generation.decoder, self.lm.model,
                                       cfg.generation.top_k, self.device)
        self.stats: CorpusStats = tokenize_corpus(
            text, self.lm.tokenizer, cfg.data.validation_fraction, cfg.data.top_k,
            min_tokens=cfg.data.block_size)
        self.corpus = {"source": source, **describe(self.stats, self.lm.tokenizer.decode)}
        batch = self.t.per_device_train_batch_size * self.t.gradient_accumulation_steps
        self.stream = BatchStream(self.stats.train_ids, cfg.data.block_size, batch, self.t.seed,
                                  cfg.data.sampling)
        n_eval = self.t.eval_batches * self.t.per_device_train_batch_size
        self.val_windows = fixed_windows(self.stats.val_ids, cfg.data.block_size, n_eval)
        self.train_windows = fixed_windows(self.stats.train_ids, cfg.data.block_size, n_eval)
        self.theta0_hash = state_hash(self.lm.model)
        # Adapter initialisation and any dropout draw from the global generator: seed it.
        torch.manual_seed(self.t.seed)
        self.build_arms(self.lm.model, self.lm.family)
        del self.lm.model  # each arm holds its own copy now

    def build_arms(self, base: nn.Module, family: str) -> None:
        """Copy θ₀ into every arm, apply its first plan, build its optimizer and tracker."""
        from transformers import get_scheduler

        self.attention = resolve_backend(self.t.attention_backend, self.device, self.bf16, base,
                                         self.cfg.data.block_size, graphs=self.graphs)
        infos = describe_params(base, family)
        self.base_info = {"n_layers": base.config.num_hidden_layers,
                          "total_params": count_params(base),
                          "tied_embeddings": any(i.tied for i in infos.values())}
        tracked = list(compile_plan(base, family, self.cfg.track).tensors)
        self.arms = []
        for acfg in self.cfg.arms:
            strat = make_arm(acfg, family, self.t.max_steps, self.calibration_batches)
            model = strat.build(base)
            # Hash each copy where it was made (host memory): the proof that all arms share θ₀.
            h = getattr(strat, "theta0_hash", None) or state_hash(model)
            model = model.to(self.device).train()
            freezer = Freezer(model)
            freezer.apply(strat.first_plan())
            # Every tensor that trains at some step is registered now: flipping requires_grad
            # later does nothing for a tensor the optimizer has never seen.
            ever = [p for n, p in freezer.params.items() if n in strat.trained_names()]
            opt = build_optimizer(ever, self.t, self.device)
            sched = get_scheduler(self.t.lr_scheduler_type, opt,
                                  num_warmup_steps=self.t.warmup_steps,
                                  num_training_steps=self.t.max_steps,
                                  scheduler_specific_kwargs=self.t.lr_scheduler_kwargs or None)
            tracker = Tracker(model, infos, tracked if strat.tracks_base_weights else [],
                              trained=strat.trained_names())
            prefix, note = self._prefix_cache(model, family, strat, infos)
            arm = ArmRun(strat, model, freezer, opt, sched, tracker, h, None, prefix, note)
            arm.step_fn = self.compiled_step(arm)
            self.arms.append(arm)
        if self.t.prefix_cache is True and not any(a.prefix for a in self.arms):
            why = "; ".join(f"{a.strategy.name}: {a.prefix_note}" for a in self.arms)
            raise PfreezeError(f"training.prefix_cache=true, but no arm can use it ({why})",
                               "set training.prefix_cache=auto (or false)")

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
        only (execution.LossOf) of the model, or of a cached arm's upper blocks. Training
        only: evaluation and generate() use the eager module, whose changing shapes would
        otherwise exhaust dynamo's recompile limit and silently send training back to eager.
        Dynamo guards on requires_grad: an arm whose plan changes would recompile at each
        change and fall back to eager after 8, so only single-plan arms compile."""
        if not (self.compile and arm.strategy.single_plan):
            return None
        return execution.compile_step(arm.step_model, self.compile_mode)

    def calibration_batches(self, n: int) -> list[torch.Tensor]:
        """Batches for data-driven selection, from their own seeded stream (not the shared one)."""
        stream = BatchStream(self.stats.train_ids, self.stream.block,
                             self.t.per_device_train_batch_size, self.t.seed + 7919)
        return [stream.next() for _ in range(n)]

    # ------------------------------------------------------------------ steps
    def _timer(self) -> Any:
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def train_step(self, arm: ArmRun, step: int, batch: torch.Tensor,
                   windows: torch.Tensor | None = None, idx: torch.Tensor | None = None) -> None:
        """One optimizer step of `arm` on `batch` (chunk ids `windows` with epochs sampling,
        on the host; `idx`: the same on the device, where the caller staged them with the
        batch). A host batch is staged here."""
        plan_changes = step in arm.strategy.plans and step > 0
        if plan_changes:
            arm.freezer.apply(arm.strategy.plan_at(step))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = self._timer()
        trainable = arm.freezer.trainable()
        total = torch.zeros((), device=self.device)
        n = self.t.gradient_accumulation_steps
        cached = arm.prefix is not None
        if cached and windows is None:  # step_fn runs the upper blocks only: never guess
            raise ValueError(f"arm '{arm.strategy.name}' caches its prefix: pass the chunk ids")
        # run() stages each step once for all arms; other callers may pass host tensors, or a
        # batch on the device without its chunk ids there.
        if batch.device.type != self.device.type:
            batch, idx = self.stage(batch, windows if cached else None)
        elif cached and idx is None:
            (idx,) = self.stage(windows)
        micro = batch.chunk(n)
        # The cache checks its contents on the host ids and gathers with the device ones.
        wins = windows.chunk(n) if cached else [None] * len(micro)
        idxs = idx.chunk(n) if cached else [None] * len(micro)
        # Not `step_fn or ...`: truth-testing a compiled module falls through to len().
        loss_of = (arm.step_fn if arm.step_fn is not None
                   else execution.LossOf(arm.step_model))
        for x, w, i in zip(micro, wins, idxs, strict=True):
            # The attention kernel is chosen in the forward; the backward follows it.
            with (autocast(self.device, self.bf16), torch.set_grad_enabled(bool(trainable)),
                  training_attention(arm.model, self.attention)):
                if cached:  # blocks f.. on block f's cached input
                    h = arm.prefix.inputs(x, w, i)
                    loss = loss_of(inputs_embeds=h, labels=x, use_cache=False) / len(micro)
                else:
                    loss = loss_of(input_ids=x, labels=x, use_cache=False) / len(micro)
            if trainable:
                loss.backward()
            total += loss.detach()
        if trainable:
            arm.freezer.mask_grads()
            if self.t.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, self.t.max_grad_norm, foreach=True)
            arm.optimizer.step()
            arm.optimizer.zero_grad(set_to_none=True)
            arm.freezer.restore()
        lr = arm.scheduler.get_last_lr()[0]  # the rate this step used (a host float: no sync)
        arm.scheduler.step()
        end = self._timer()
        mem = None
        if self.device.type == "cuda":
            mem = torch.cuda.max_memory_allocated(self.device) / 2**20
            # CUDA-graph pools are reserved once, not allocated in a step: the process's
            # reserved peak (all arms) is what bounds the batch, so it is kept too.
            self.reserved_mb = max(self.reserved_mb,
                                   torch.cuda.max_memory_reserved(self.device) / 2**20)
        dw, dw0 = arm.tracker.step()
        arm.pending.append(StepRecord(step + 1, total, dw, dw0, start, end, mem, lr))
        if self.t.integrity_steps and (step + 1) % self.t.integrity_steps == 0:
            check_audit(arm.strategy.name, arm.freezer.audit())

    def _guarded_step(self, arm: ArmRun, step: int, batch: torch.Tensor,
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
                if mem is not None:
                    arm.peak_mem_mb = max(arm.peak_mem_mb or 0.0, mem)
            arm.pending.clear()
        self.files.append_metrics(rows)
        return last

    # ------------------------------------------------------------------ run
    def run(self, resume: bool = False) -> dict[str, Any]:
        """The whole run: checks, setup, the before-measurements (or a checkpoint), the steps,
        the after-measurements and the outputs. SIGINT/SIGTERM stop it at a step boundary with
        a checkpoint (where save_steps is set) and a summary whose status says so."""
        self.phase, self.done, self.p_before = "setup", 0, None
        self.saved_at: int | None = None  # the step of the last checkpoint written
        self.tried_at: int | None = None  # the step of the last checkpoint attempted
        with Signals() as self.signals:
            try:
                self._begin(resume)
                t_start = time.perf_counter()
                self._train()
                return self._finish(time.perf_counter() - t_start)
            except Interrupted as e:
                self._interrupted(e)
                raise

    def _begin(self, resume: bool) -> None:
        from pfreeze import checkpoint

        if resume and not checkpoint.exists(self.files.root):
            raise PfreezeError(
                f"{self.files.root} has no checkpoint yet "
                f"(training.save_steps={self.t.save_steps})",
                "rerun with --overwrite to start it again; set save_steps to checkpoint",
            )
        self.files.check_target()
        if not resume:
            self.files.check_free(dump_config(self.cfg))
        # Read the corpus and load the model before writing anything: bad input must not
        # leave a half-started run directory that blocks the corrected retry.
        self.setup()
        self.batch_hashes: list[str] = []
        if resume:
            state = checkpoint.load(self)
            self.files.resume(state)
            self.done, self.p_before = state["step"], state["p_before"]
            self.saved_at = self.done
            self.phase = "train"
            return
        if self.before_start:
            self.before_start()
        self.files.start(dump_config(self.cfg))
        self.phase = "before"
        evaluate_arms(self, 0)
        self.p_before = sample_arms(self, "before")
        self.phase = "train"

    def _train(self) -> None:
        """The steps from the last completed one; SIGINT/SIGTERM wait for the step boundary."""
        for step in range(self.done, self.t.max_steps):
            if all(a.stopped for a in self.arms):
                break
            with self.signals.deferred():
                last = self._step_all(step)
                self.done = step + 1
                if self.t.save_steps and self.done % self.t.save_steps == 0:
                    self._checkpoint()
            if self.on_step:
                self.on_step(self.done, last)
            self.signals.check()
        with self.signals.deferred():
            if any(a.pending for a in self.arms):  # an early end between logging steps
                self.flush()
            if self.t.save_steps:  # the trained state, before the outputs that depend on it
                self._checkpoint()
        self.signals.check()

    def _step_all(self, step: int) -> dict[str, float]:
        """Step `step` of every arm on one batch; metrics and evaluations when they are due."""
        batch = self.stream.next()
        self.batch_hashes.append(hashlib.sha1(batch.numpy().tobytes()).hexdigest()[:16])
        windows = self.stream.windows
        # Once for every arm; chunk ids only where an arm caches its prefix.
        batch, idx = self.stage(batch, windows if any(a.prefix for a in self.arms) else None)
        for arm in self.arms:
            if arm.stopped is None:
                self._guarded_step(arm, step, batch, windows, idx)
        done = step + 1
        save = self.t.save_steps and done % self.t.save_steps == 0
        last: dict[str, float] = {}
        if done % self.t.logging_steps == 0 or done == self.t.max_steps or save:
            last = self.flush()
        if done % self.t.eval_steps == 0 and done < self.t.max_steps:
            evaluate_arms(self, done)
        return last

    def _checkpoint(self) -> None:
        """Save at the last completed step (once); a save the disk cannot take is skipped with
        a warning: training goes on, and the previous checkpoint stays whole."""
        from pfreeze import checkpoint

        if self.done in (self.saved_at, self.tried_at):
            return
        self.tried_at = self.done
        try:
            checkpoint.save(self, self.done, {"p_before": self.p_before})
            self.saved_at = self.done
        except (OSError, NoSpace) as e:
            if isinstance(e, OSError) and not is_no_space(e):
                raise
            kept = f"step {self.saved_at}" if self.saved_at else "none"
            self.warn(f"checkpoint at step {self.done} skipped ({' '.join(str(e).split())}); "
                      f"training goes on, the last checkpoint kept: {kept}")

    def _interrupted(self, e: Interrupted) -> None:
        """Keep what an interrupted run has: a checkpoint where the arms agree on the step, and
        a summary whose status says where it stopped."""
        e.step = self.done if self.phase != "setup" else None
        if self.phase == "setup":
            e.note = "nothing was written"
            return
        consistent = self.phase in ("train", "after") and not e.forced
        if consistent and any(a.pending for a in self.arms):
            self.flush()
        if consistent and self.t.save_steps:
            self._checkpoint()
        e.note = (f"checkpoint at step {self.saved_at} kept" if self.saved_at is not None
                  else "no checkpoint (set training.save_steps to make runs resumable)")
        arms = {a.strategy.name: arm_summary(self, a, (self.p_before or {}).get(a.strategy.name),
                                             None, None, None) for a in self.arms}
        summary = run_summary(self, None, arms, status="interrupted")
        summary["interrupted_at_step"] = e.step
        self.files.write_summary(summary)

    def _finish(self, wall: float) -> dict[str, Any]:
        """The after-measurements, the arms' files, then the summary. A file that cannot be
        written (a full disk, a model that will not serialise) costs that file alone: the
        summary says what is missing and the run ends with one line."""
        self.phase = "after"
        evaluate_arms(self, self.t.max_steps)
        p_after = sample_arms(self, "after")
        p_best = sample_best(self) if self.t.keep_best else {}
        release_twin()
        arms_summary = {}
        for arm in self.arms:
            name = arm.strategy.name
            arms_summary[name] = arm_summary(self, arm, (self.p_before or {}).get(name),
                                             p_after[name], p_best.get(name),
                                             arm.freezer.audit())
        summary = run_summary(self, wall, arms_summary)
        # The arms' files first: a summary that says "finished" promises them (a kill between
        # the two must leave a run to resume, not a finished one without its tensors).
        missing = []
        for arm in self.arms:
            missing += self.files.save_arm(arm.strategy, arm.model, self.lm.tokenizer,
                                           self.cfg.save_pretrained, arm.best_state)
        if self.files.unwritten:
            self.files.append_metrics([])  # one more try, now that the run is over
        if self.files.unwritten:
            missing.append({"file": "metrics.jsonl", "why": f"{len(self.files.unwritten)} "
                            "rows could not be appended (the disk is full)"})
        if missing:
            summary["missing_outputs"] = missing
        self._write_summary(summary)
        if missing:
            self._missing(missing)
        for name, a in arms_summary.items():
            integ = a["integrity"]
            if integ and not integ["ok"]:
                check_audit(name, integ)
        return summary

    def _write_summary(self, summary: dict[str, Any]) -> None:
        try:
            self.files.write_summary(summary)
        except OSError as e:
            self._missing([{"file": "summary.json", "why": e.strerror or str(e)}])

    def _missing(self, missing: list[dict[str, str]]) -> None:
        first = missing[0]
        more = f" and {len(missing) - 1} more (listed in summary.json)" if len(missing) > 1 else ""
        fix = ("free disk space (or fix the cause), then `pfreeze run --resume "
               f"{self.files.root}` writes the outputs again from the final checkpoint"
               if self.saved_at == self.done else
               "free disk space (or fix the cause) and run it again; with "
               "training.save_steps set, a resume rewrites the outputs instead")
        raise PfreezeError(f"training finished, but {first['file']} could not be written "
                           f"({first['why']}){more}", fix)


def run(cfg: RunConfig, output_dir: str | Path | None = None, overwrite: bool = False,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
        resume: bool = False, command: str | None = None,
        before_start: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run the experiment described by `cfg`; returns the summary (also in summary.json).

    With `resume`, continue from the output directory's last checkpoint (if it has one).
    """
    out = Path(output_dir or cfg.output_dir)
    if cfg.repeats > 1:
        from pfreeze.repeats import run_repeats

        return run_repeats(cfg, out, run, overwrite=overwrite, on_step=on_step, resume=resume,
                           command=command)
    if resume and (done := finished(out)) is not None:
        return done  # nothing to redo: the CLI says so
    files = RunFiles(out, overwrite=overwrite)
    loop = Loop(cfg, files, on_step)
    loop.command, loop.before_start = command, before_start
    return loop.run(resume=resume)
