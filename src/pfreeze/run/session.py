"""A whole run, phase by phase, and what it leaves in its directory.

    setup    read the corpus and load the model before anything is written (bad input leaves
             no half-made directory); start the run's files, or restore its checkpoint
    before   held-out loss and p of every arm (once, when every arm is θ₀)
    train    every step: one batch for every arm; metrics, evaluations and checkpoints when
             due. SIGINT/SIGTERM wait for the step boundary (pfreeze.run.interrupts)
    after    the same measurements, the arms' files, then the summary (written last: a
             "finished" summary promises the files)

A checkpoint holds what `Loop` cannot rebuild from the config and θ₀ (ArmRun.checkpoint_tensors,
the optimizer, ArmRun.state, the random states, the run's files as they stood); a resume checks
it belongs to this config and θ₀ and keeps the runtime and arms placement the run started
with. With arms_placement=sequential the phases run once per arm, turn by turn, and a
checkpoint holds the arm of the turn and the turns before (pfreeze.run.turns).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pfreeze import __version__
from pfreeze.errors import PfreezeError
from pfreeze.measure.generation import release_twin
from pfreeze.outputs import checkpoint, trackers
from pfreeze.outputs.files import NoSpace, RunFiles, finished, is_no_space
from pfreeze.plan.masks import check_audit
from pfreeze.run.arm_run import ArmRun
from pfreeze.run.distributed import peers_watched, single_process_only
from pfreeze.run.interrupts import Interrupted, Signals
from pfreeze.run.loop import Loop
from pfreeze.run.turns import Turns
from pfreeze.settings import RunSpec, digest, dump

log = logging.getLogger("pfreeze.run")  # the phases (loop.py says why)


def config_hash(cfg: RunSpec) -> str:
    """What a checkpoint belongs to: every setting but the folder the run sits in (a run may
    be resumed under another spelling of its path, and each repeat has its own)."""
    return digest(cfg, exclude={"output_dir"})


class Session(Turns):
    """One run of `loop` into its files; `run()` does it all (arms_placement=sequential: turn
    by turn, pfreeze.run.turns)."""

    def __init__(self, loop: Loop, command: str | None = None,
                 before_start: Callable[[], None] | None = None) -> None:
        if loop.files is None:
            raise ValueError("a Session needs a Loop with run files")
        self.loop, self.files, self.t = loop, loop.files, loop.t
        self.command = command  # the CLI's; None for runs from the Python API
        self.before_start = before_start  # a repeat's parent directory, written once setup passed
        self.phase, self.done, self.p_before = "setup", 0, None
        self.init_turns()
        # (turn, step) of the last checkpoint written, and of the last one attempted
        self.saved: tuple[int, int] | None = None
        self.tried: tuple[int, int] | None = None

    def run(self, resume: bool = False) -> dict[str, Any]:
        """The whole run: checks, setup, the before-measurements (or a checkpoint), the steps,
        the after-measurements and the outputs. SIGINT/SIGTERM stop it at a step boundary with
        a checkpoint (where save_steps is set) and a summary whose status says so."""
        with Signals() as self.signals:
            try:
                self._begin(resume)
                t_start = time.perf_counter()
                if self.loop.placement == "sequential":
                    return self._sequential(t_start)
                self._train()
                return self._finish(time.perf_counter() - t_start)
            except Interrupted as e:
                self._interrupted(e)
                raise

    def _begin(self, resume: bool) -> None:
        loop, files = self.loop, self.files
        if resume and not checkpoint.exists(files.root):
            raise PfreezeError(
                f"{files.root} has no checkpoint yet "
                f"(training.save_steps={self.t.save_steps})",
                "rerun with --overwrite to start it again; set save_steps to checkpoint",
            )
        files.check_target()
        trackers.check(self.t.report_to)  # a missing tracker package, before any loading
        if not resume:
            files.check_free(dump(loop.cfg))
        else:  # the arms go where they were when the checkpoint was made
            loop.kept_placement = checkpoint.placement(files.root)
        # Read the corpus and load the model before writing anything: bad input must not
        # leave a half-started run directory that blocks the corrected retry.
        loop.setup()
        loop.batch_hashes = []
        if resume:
            with self.signals.deferred():  # the run's files go back to the checkpoint whole
                state = self._restore()
                files.resume(state)
                files.open_trackers(loop.cfg, fresh=False)
                self.done, self.p_before = state["step"], state["p_before"]
                self.saved = (self.turn, self.done)
                self.phase = "train"
            self.signals.check()
            return
        with self.signals.deferred():  # the old run goes and config.yaml comes as one step
            if self.before_start:
                self.before_start()
            files.start(dump(loop.cfg))
            files.open_trackers(loop.cfg, fresh=True)
            self.phase = "before"
        self.signals.check()
        if loop.arms:  # sequential: none yet, each turn measures its own
            log.info("measuring before training")
        loop.moments.evaluate(0)
        self.p_before = loop.moments.sample("before")
        self.phase = "train"

    def _train(self) -> None:
        """The steps from the last completed one; SIGINT/SIGTERM wait for the step boundary."""
        self.loop.share_signals(self.signals)
        log.info("training")
        for step in range(self.done, self.t.max_steps):
            if self.loop.all_stopped():
                break
            with self.signals.deferred():
                last = self._step_all(step)
                self.done = step + 1
                if self.t.save_steps and self.done % self.t.save_steps == 0:
                    self._checkpoint()
            if self.loop.on_step:
                self.loop.on_step(self.done, last)
            self.signals.check()
        with self.signals.deferred():
            if self.loop.any_pending():  # an early end between logging steps
                self.loop.flush()
            if self.t.save_steps:  # the trained state, before the outputs that depend on it
                self._checkpoint()
        self.signals.check()
        self.loop.share_signals(self.signals, on=False)

    def _step_all(self, step: int) -> dict[str, float]:
        """Step `step` of every arm on one batch; metrics and evaluations when they are due."""
        loop = self.loop
        batch = loop.stream.next()
        loop.batch_hashes.append(hashlib.sha1(batch.numpy().tobytes()).hexdigest()[:16])
        windows = loop.stream.windows
        # Once for every arm; chunk ids only where an arm caches its prefix.
        batch, idx = loop.stage(batch, windows if any(a.prefix for a in loop.arms) else None)
        for arm in loop.arms:
            if arm.stopped is None:
                loop.guarded_step(arm, step, batch, windows, idx)
        done = step + 1
        save = self.t.save_steps and done % self.t.save_steps == 0
        last: dict[str, float] = {}
        if done % self.t.logging_steps == 0 or done == self.t.max_steps or save:
            last = loop.flush()
        if done % self.t.eval_steps == 0 and done < self.t.max_steps:
            loop.moments.evaluate(done)
        return last

    @property
    def saved_at(self) -> int | None:
        """The step of the last checkpoint written (of its turn, in a sequential run)."""
        return self.saved[1] if self.saved else None

    def _checkpoint(self) -> None:
        """Save at the last completed step (once); a save the disk cannot take is skipped with
        a warning: training goes on, and the previous checkpoint stays whole."""
        if (self.turn, self.done) in (self.saved, self.tried):
            return
        self.tried = (self.turn, self.done)
        try:
            self._save()
            self.saved = self.tried
        except (OSError, NoSpace) as e:
            if isinstance(e, OSError) and not is_no_space(e):
                raise
            kept = f"step {self.saved_at}{self.turn_note(self.saved[0])}" if self.saved else "none"
            self.loop.warn(f"checkpoint at step {self.done} skipped ({' '.join(str(e).split())}); "
                      f"training goes on, the last checkpoint kept: {kept}")

    def _interrupted(self, e: Interrupted) -> None:
        """Keep what an interrupted run has: a checkpoint where the arms agree on the step, and
        a summary whose status says where it stopped. Further signals are ignored meanwhile."""
        e.step = self.done if self.phase != "setup" else None
        if self.phase == "setup":
            e.note = "nothing was written"
            return
        with self.signals.ignored():
            # Several ranks: only a signal they agreed on finds every rank at this step.
            consistent = (self.phase in ("train", "after") and not e.forced
                          and (e.agreed or not self.loop.world.distributed))
            if consistent and self.loop.any_pending():
                self.loop.flush()
            if consistent and self.t.save_steps:
                self._checkpoint()
            e.note = (f"checkpoint at step {self.saved_at}{self.turn_note(self.saved[0])} kept"
                      if self.saved else
                      "no checkpoint (set training.save_steps to make runs resumable)")
            arms = {**self.finished, **{a.strategy.name: self._arm(a, None, None, None)
                                        for a in self.loop.arms
                                        if a.strategy.name not in self.finished}}
            if e.agreed:  # rank 0 writes every rank's arms
                arms = (self.loop.gather_summaries(arms, []) or (arms, []))[0]
            summary = self._summary(None, arms, status="interrupted")
            summary["interrupted_at_step"] = e.step
            self.files.write_summary(summary)
            self.files.close_metrics()  # the trackers end their runs too

    def _finish(self, wall: float) -> dict[str, Any]:
        """The after-measurements, the arms' files, then the summary."""
        self.phase = "after"
        return self._conclude(wall, *self._after())

    def _after(self) -> tuple[dict[str, Any], list[dict[str, str]]]:
        """The after-measurements and files of the arms; their summaries, files not written."""
        loop = self.loop
        loop.unshard()  # a sharded arm is measured and saved whole
        log.info("measuring after training")
        loop.moments.evaluate(self.t.max_steps)
        p_after = loop.moments.sample("after")
        p_best = loop.moments.sample_best() if self.t.keep_best else {}
        release_twin()
        arms_summary = {a.strategy.name: self._arm(a, p_after[a.strategy.name],
                                                   p_best.get(a.strategy.name), a.freezer.audit())
                        for a in loop.arms}
        # The arms' files first: a summary that says "finished" promises them (a kill between
        # the two must leave a run to resume, not a finished one without its tensors).
        missing = []
        log.info("writing outputs")
        for arm in loop.arms:
            missing += self.files.save_arm(arm.strategy, arm.model, loop.lm.tokenizer,
                                           loop.cfg.save_pretrained, arm.best_state,
                                           loop.theta0_hash)
        return arms_summary, missing

    def _conclude(self, wall: float, arms_summary: dict[str, Any],
                  missing: list[dict[str, str]]) -> dict[str, Any]:
        """The summary, written last. A file that cannot be written (a full disk, a model
        that will not serialise) costs that file alone: the summary says what is missing and
        the run ends with one line."""
        gathered = self.loop.gather_summaries(arms_summary, missing)
        if gathered is None:  # another rank's arms: rank 0 writes the summary
            self.files.close_metrics()
            return self._summary(wall, arms_summary)
        arms_summary, missing = gathered
        summary = self._summary(wall, arms_summary)
        missing += self.files.close_metrics()
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
        # No resume writes again what an earlier turn of a sequential run lost.
        fix = ("free disk space (or fix the cause), then `pfreeze run --resume "
               f"{self.files.root}` writes the outputs again from the final checkpoint"
               if self.saved == (self.turn, self.done) and not self.lost else
               "free disk space (or fix the cause) and run it again" + ("" if self.lost else
               "; with training.save_steps set, a resume rewrites the outputs instead"))
        raise PfreezeError(f"training finished, but {first['file']} could not be written "
                           f"({first['why']}){more}", fix)

    # ------------------------------------------------------------------ checkpoints
    def _save(self) -> None:
        loop = self.loop
        got = loop.checkpoint_parts()
        if got is None:  # rank 0 writes the checkpoint of every arm
            return
        arms, shards = got
        if self.files.jsonl.unwritten:  # the checkpoint records metrics.jsonl's size
            raise NoSpace("metrics.jsonl is behind (rows the full disk refused are held)",
                          "free disk space")
        # Random states on their own: the batch stream, and the global generators that
        # dropout and adapter initialisation draw from.
        rng = {"stream": loop.stream.gen.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{d}": s for d, s in enumerate(torch.cuda.get_rng_state_all())})
        checkpoint.save(self.files.root, [a for a, _ in arms], rng, {
            "pfreeze_version": __version__, "config_hash": config_hash(loop.cfg),
            "step": self.done, "theta0_hash": loop.theta0_hash,
            "batch_hashes": loop.batch_hashes, "arms": [s for _, s in arms],
            "replicas": loop.dist.replicas,
            "execution": loop.rt.settings(), "reserved_mb": loop.reserved_mb,
            "p_before": self.p_before,
            "placement": loop.placement, "sequential": self.turn_state(),
            # The run's files as they stood at this step: a resume cuts metrics.jsonl back
            # to this size (rows after it are redone) and restores the samples drawn so far.
            "metrics_bytes": self.files.metrics_bytes(), "samples": self.files.samples,
            "sample_records": self.files.sample_records}, shards)

    def _restore(self) -> dict[str, Any]:
        """Arms, stream, random states and runtime back to the checkpoint; state.json."""
        loop, root = self.loop, self.files.root
        sequential = loop.placement == "sequential"
        state, arms, rng = checkpoint.load(root, loop.device, None if sequential else loop.mine)
        if state["config_hash"] != config_hash(loop.cfg):
            raise PfreezeError(
                f"the checkpoint in {root} belongs to another config than the one resumed now "
                "(config.yaml changed since it was saved, or another pfreeze version with other "
                "settings wrote it)",
                "resume with the config the run was started with, or start again with "
                "--overwrite")
        if state["theta0_hash"] != loop.theta0_hash:
            raise PfreezeError(
                "the checkpoint was made from a different θ₀ than the model loaded now",
                "resume with the same model files, or start a new run")
        step = state["step"]
        if sequential:
            self.restore_turn(state, arms)
        else:
            loop.restore_arms(state, arms, checkpoint.folder(root))
        loop.stream.gen.set_state(rng["stream"])
        # One batch per step from step 0, whatever the arms did: the epochs mode's position.
        loop.stream.drawn = step * loop.stream.batch
        torch.set_rng_state(rng["torch"])
        cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        loop.batch_hashes = state["batch_hashes"]
        model = loop.arms[0].model if loop.arms else loop.theta0[0]  # between two turns: θ₀
        loop.set_runtime(loop.rt.resumed(state["execution"], self.t, model,
                                         loop.cfg.data.block_size, loop.warn))
        loop.reserved_mb = max(loop.reserved_mb, state["reserved_mb"])
        return state

    # ------------------------------------------------------------------ summary
    def _arm(self, arm: ArmRun, p_after: dict | None, p_best: dict | None,
             audit: dict | None) -> dict[str, Any]:
        loop = self.loop
        return arm.summary(loop.stream.batch * loop.stream.block, loop.rt.compiled,
                           (self.p_before or {}).get(arm.strategy.name), p_after, p_best, audit)

    def _summary(self, wall: float | None, arms: dict[str, dict[str, Any]],
                 status: str = "finished") -> dict[str, Any]:
        return self.loop.summary(self.command, wall, arms, status)


def run_loop(loop: Loop, resume: bool = False, command: str | None = None,
             before_start: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run `loop` (built with its RunFiles) to the end; its summary."""
    with peers_watched(loop.world):  # a rank that died: one line on the others
        return Session(loop, command, before_start).run(resume)


def run(cfg: RunSpec, output_dir: str | Path | None = None, overwrite: bool = False,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
        resume: bool = False, command: str | None = None,
        before_start: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run the experiment described by `cfg`; returns the summary (also in summary.json).

    With `resume`, continue from the output directory's last checkpoint (if it has one); a
    finished run is returned as it is.
    """
    out = Path(output_dir or cfg.output_dir)
    if cfg.repeats > 1:
        single_process_only("repeats > 1", "run each seed as a distributed run of its own")
        from pfreeze.run.repeats import run_repeats

        return run_repeats(cfg, out, run, overwrite=overwrite, on_step=on_step, resume=resume,
                           command=command)
    if resume and (done := finished(out)) is not None:
        return done  # nothing to redo: the CLI says so
    loop = Loop(cfg, RunFiles(out, overwrite=overwrite), on_step)
    return run_loop(loop, resume, command, before_start)
