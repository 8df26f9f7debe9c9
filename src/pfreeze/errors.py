"""One exception type for every mistake a user can make.

The CLI prints a PfreezeError as a single line (problem, then the fix) and exits non-zero;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class PfreezeError(Exception):
    """A problem with the user's input or environment, worded as `problem; fix`."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)
