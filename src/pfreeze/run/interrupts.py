"""SIGINT and SIGTERM as an orderly stop: at a step boundary, with a checkpoint, and an exit
code that says the run did not finish (130 and 143, as a shell reports a killed program).

Inside `deferred()` (a training step and its bookkeeping, where the arms would otherwise end
at different steps) a signal is only noted, and `check()` raises it at the next boundary.
Elsewhere (loading, evaluation, the final outputs) it raises at once. A second signal while
one is pending raises at once too: a user who presses Ctrl-C twice wants out now.

With several ranks (`shared` set while they train) a signal is only noted, whenever it comes,
and it counts once the ranks have told each other at their next metrics flush: every rank
then stops at the same step boundary, where the checkpoint and summary are collective.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType

NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class Interrupted(Exception):  # noqa: N818 - it is what happened, not an error
    """The run was stopped by a signal; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, forced: bool = False) -> None:
        # forced: a second signal cut a deferred block short (a step may be half done)
        self.signum, self.forced = signum, forced
        self.agreed = False  # every rank of a distributed run stops at this same boundary
        self.step: int | None = None  # the last completed step, filled in by the loop
        self.note = ""  # what was kept, filled in by the loop
        super().__init__(NAMES.get(signum, f"signal {signum}"))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def message(self, root: str) -> str:
        where = f" at step {self.step}" if self.step is not None else ""
        return f"interrupted ({NAMES.get(self.signum, self.signum)}){where}; {self.note}" + (
            f" (`pfreeze run --resume {root}` continues it)" if "checkpoint" in self.note else "")


class Signals:
    """Install the handlers for the duration of a run (main thread only: Python delivers
    signals there, and a run started from another thread keeps the default behaviour)."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self.deferring = self.ignoring = False
        self._old: dict[int, object] = {}
        # Several ranks: the signal any rank noted, as the last collective told every rank.
        self.shared: Callable[[], int | None] | None = None

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            for s in NAMES:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)  # type: ignore[arg-type]
        self._old.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.ignoring:
            return
        if (self.deferring or self.shared is not None) and self.pending is None:
            self.pending = signum
            return
        raise Interrupted(signum, forced=self.deferring)

    @contextmanager
    def ignored(self) -> Iterator[None]:
        """Signals do nothing inside: keeping what an interrupted run has must not itself be
        cut short by the next Ctrl-C."""
        self.ignoring = True
        try:
            yield
        finally:
            self.ignoring = False

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False

    def check(self) -> None:
        """At a boundary: raise the signal that arrived inside the last deferred block (with
        several ranks: the one every rank has heard of)."""
        if self.shared is not None:
            signum = self.shared()
            if signum is not None:
                self.pending, e = None, Interrupted(signum)
                e.agreed = True
                raise e
            return
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise Interrupted(signum)
