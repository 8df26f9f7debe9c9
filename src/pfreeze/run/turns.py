"""arms_placement=sequential: the arms' turns, one arm on the device at a time, and what their
checkpoints hold beyond a together run's.

A turn is one arm's whole run (before, steps, after) on the batch stream from its start. The
checkpoints written during a turn are a together run's with that one arm, plus the turn's
place (`Turns.turn_state`): whose turn it is, the summaries and missing files of the arms whose
turn is over (their files are written by then), and the batch hashes they saw. Once an arm's
files are written, one more checkpoint holds no arm at all: the next turn starts from θ₀, so a
kill before that turn's first checkpoint does not redo the finished arm's after-measurements.
A resume skips the finished arms, rebuilds the arm of the turn from θ₀, restores it and goes on
from its step; then the remaining arms take their turns.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pfreeze.errors import PfreezeError

log = logging.getLogger("pfreeze.run")  # the phases (loop.py says why)


class Turns:
    """The session's sequential placement (mixed into pfreeze.run.session.Session, whose
    attributes and phases it uses: loop, t, signals, phase, done, p_before, _train, _after,
    _checkpoint, _conclude)."""

    loop: Any
    t: Any
    signals: Any
    phase: str
    done: int
    p_before: dict[str, Any] | None

    def init_turns(self) -> None:
        self.turn = 0  # the arm whose turn it is (sequential); always 0 in a together run
        self.finished: dict[str, Any] = {}  # the summaries of the arms whose turn is over
        # Files that could not be written in turns before the last one (a resume from the
        # final checkpoint writes again only the last turn's).
        self.lost: list[dict[str, str]] = []
        self.hashes: list[str] = []  # the batches they saw (the longest list: one may stop early)
        self.resumed = False  # the arm of this turn came back from a checkpoint, mid-turn

    def _sequential(self, t_start: float) -> dict[str, Any]:
        """Each arm's turn from the current one, then the summary of all."""
        self.p_before, last = self.p_before or {}, []
        for i in range(self.turn, len(self.loop.cfg.arms)):
            self.turn = i
            if not self.resumed:
                self._start_turn(i)
            self.resumed = False
            self._train()
            last = self._end_turn()
        self.loop.batch_hashes = self.hashes
        return self._conclude(time.perf_counter() - t_start, self.finished, self.lost + last)

    def _start_turn(self, i: int) -> None:
        """Arm `i` built from θ₀ on the device (the stream from its start), measured before."""
        loop = self.loop
        loop.turn(i)  # no reference kept: the next turn frees it
        self.phase, self.done = "before", 0
        log.info("measuring before training")
        loop.moments.evaluate(0)
        self.p_before.update(loop.moments.sample("before"))
        self.phase = "train"

    def _end_turn(self) -> list[dict[str, str]]:
        """The arm's after-measurements and files; with turns still to come it leaves the
        device, and a checkpoint (no arm in it) says the next turn starts from θ₀. The last
        turn's files that could not be written."""
        loop = self.loop
        name = loop.arms[0].strategy.name
        # The same batches as the arms before saw (one that stopped early saw fewer).
        n = min(len(self.hashes), len(loop.batch_hashes))
        if loop.batch_hashes[:n] != self.hashes[:n]:
            raise PfreezeError(f"arm '{name}' saw other batches than the first",
                               "this is a pfreeze bug; please report it with the config")
        self.hashes = max(self.hashes, loop.batch_hashes, key=len)
        self.phase = "after"
        done, lost = self._after()
        self.finished.update(done)
        if self.turn + 1 == len(loop.cfg.arms):
            return lost
        self.lost += lost
        with self.signals.deferred():  # the turn is over in the checkpoint, or not at all
            loop.leave()
            self.turn, self.done = self.turn + 1, 0
            if self.t.save_steps:
                self._checkpoint()
        self.signals.check()
        return []

    def turn_state(self) -> dict[str, Any] | None:
        """A sequential checkpoint's place among the turns (None: a together run's)."""
        if self.loop.placement != "sequential":
            return None
        return {"turn": self.turn, "finished": self.finished, "lost": self.lost,
                "hashes": self.hashes}

    def restore_turn(self, state: dict[str, Any],
                     arms: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
        """A sequential run back to its checkpoint's turn: the finished arms' summaries, and
        the arm of the turn rebuilt from θ₀ and restored (none: the turn had not begun)."""
        saved = state["sequential"]
        self.turn, self.finished = saved["turn"], saved["finished"]
        self.lost, self.hashes = saved["lost"], saved["hashes"]
        if not state["arms"]:
            return
        (tensors, optimizer), = arms
        self.loop.turn(self.turn).restore(state["step"], tensors, optimizer, state["arms"][0])
        self.resumed = True

    def turn_note(self, turn: int) -> str:
        """Which arm's turn a checkpoint of `turn` was made in ('' in a together run)."""
        if self.loop.placement != "sequential":
            return ""
        return f" of arm '{self.loop.cfg.arms[turn].name}'"
