"""Metric sinks: where each step's and each evaluation's rows go, one small interface for all.

metrics.jsonl is the run's own record (the report and a resume read it) and is always written;
an experiment tracker is another sink with the same two methods, receiving the same rows.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any, Protocol

Row = dict[str, Any]  # {"kind": "train" | "eval", "step": k, "arm": name, ...figures}


class MetricLogger(Protocol):
    def log(self, rows: list[Row]) -> None:
        """Take the rows of one flush (every arm's steps since the last one, or an evaluation)."""

    def close(self) -> None:
        """The run is over: write what is still held."""


class JsonlLogger:
    """One JSON object per line, appended. A failed append (a full disk) keeps its rows for
    the next one, so training goes on and what could not be written is reported at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.unwritten: list[Row] = []

    def log(self, rows: list[Row]) -> None:
        rows = self.unwritten + rows
        if not rows:
            return
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))
            self.unwritten = []
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self.unwritten = rows
            # A write cut short leaves part of the rows (a torn line): back to where it began,
            # so the retry writes each row once (truncating needs no free space).
            if self.path.exists():
                with open(self.path, "r+b") as f:
                    f.truncate(size)

    def close(self) -> None:
        self.log([])  # one more try, now that the run is over


def read_jsonl(path: Path) -> list[Any]:
    """The rows of a JSON-lines file the loggers wrote (metrics, samples); none if it is
    missing. A torn line (a killed run's last) and undecodable bytes are skipped, not fatal."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
