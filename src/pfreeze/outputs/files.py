"""The run directory: every file a run writes, and the rule that none is ever half-written.

    config.yaml        the resolved config (written first: a run describes itself)
    metrics.jsonl      one row per step and arm, plus eval rows (appended; a torn last line
                       from a killed run is skipped by readers)
    samples.txt        generated text, per arm, before and after
    samples.jsonl      the same samples with their token ids: p can be recomputed exactly
    summary.json       everything the report needs (written last, atomically); its `status`
                       says finished or interrupted
    arms/<name>/       trained.safetensors (only tensors that trained), adapter/ for LoRA,
                       model/ with save_pretrained when asked
    checkpoint/        resume state (checkpoint.py)
    report.*, *.png    the report (report.py)

A directory holds one run: `--overwrite` removes all of the above before anything new is
written, so nothing of an old run can be mistaken for (or resumed as) part of the new one.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from pfreeze.atomic import atomic_write, write_json, write_text
from pfreeze.errors import PfreezeError
from pfreeze.outputs import trackers
from pfreeze.outputs.loggers import JsonlLogger, MetricLogger
from pfreeze.settings import RunSpec

# Everything a run (and its report and repeats) writes into its directory, by exact name:
# a user's own files beside them are never touched. The folders are pfreeze's own.
FILES = ("summary.json", "config.yaml", "metrics.jsonl", "samples.txt", "samples.jsonl",
         "report.md", "report.html", "loss.png", "loss_scatter.png", "step_time.png", "dw.png",
         "dw0.png", "p.png", "repeats.json", "repeats.md", "evidence.html", "evidence.md",
         "evidence-curves.png", "evidence-scatter.png")
FOLDERS = ("checkpoint", ".checkpoint.old", ".checkpoint.tmp", ".checkpoint.shards", "arms",
           "tensorboard", "wandb")
# What marks a directory as a run's (so that its folders above are pfreeze's).
MARKS = ("config.yaml", "summary.json", "metrics.jsonl", "checkpoint", ".checkpoint.old")


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"


def ensure_space(folder: Path, nbytes: int, what: str) -> None:
    """Refuse a write of `nbytes` that the disk cannot take, before a byte of it is written
    (a full disk mid-write costs the write and the time it took)."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    # A little room beyond the payload: file-system metadata and the temporary sibling.
    if nbytes + 2**20 > free:
        raise NoSpace(f"not enough disk space for {what}: it needs {mib(nbytes)}, "
                      f"{mib(free)} free in {probe}", "free disk space, then rerun")


class NoSpace(PfreezeError):
    """A write refused (or failed) for lack of disk space."""


def is_no_space(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def tensors_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class RunFiles:
    def __init__(self, root: Path, overwrite: bool = False) -> None:
        self.root = Path(root)
        self.overwrite = overwrite
        self.samples: list[str] = []  # samples.txt, block by block
        self.sample_records: list[dict[str, Any]] = []  # samples.jsonl, row by row
        self.jsonl = JsonlLogger(self.root / "metrics.jsonl")
        self.loggers: list[MetricLogger] = [self.jsonl]  # trackers are appended here

    def check_target(self) -> None:
        """Refuse, before anything is loaded or written, an output path that cannot hold a run:
        a file, a path under a file, a read-only or virtual file system."""
        root, made = self.root, []
        for p in (root, *root.parents):
            if p.exists():
                if not p.is_dir():
                    raise PfreezeError(f"output path {root}: {p} is a file, not a directory",
                                       "pass another --output-dir")
                break
        try:
            for p in reversed((root, *root.parents)):
                if not p.exists():
                    p.mkdir()
                    made.append(p)
            fd, probe = tempfile.mkstemp(prefix=".pfreeze-probe.", dir=root)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise PfreezeError(f"cannot write into output directory {root} "
                               f"({e.strerror or e})", "pass a writable --output-dir") from None
        finally:
            for p in reversed(made):  # the probe leaves no trace
                p.rmdir()

    def check_free(self, config_yaml: str) -> None:
        """Refuse to write into a directory that holds another run (unless overwriting)."""
        old = self.root / "config.yaml"
        if old.exists() and not self.overwrite:
            same = old.read_text(encoding="utf-8") == config_yaml
            resumable = same and any((self.root / d / "state.json").exists()
                                     for d in ("checkpoint", ".checkpoint.old"))
            raise PfreezeError(
                f"{self.root} already holds {'this' if same else 'a different'} run",
                "pass another --output-dir, --overwrite to replace it"
                + (", or --resume to continue it" if resumable else ""),
            )

    def holds_a_run(self) -> bool:
        return any((self.root / m).exists() for m in MARKS)

    def clear(self) -> None:
        """Remove what a run wrote here: its files by name, its folders and repeats, and the
        temporary siblings of its atomic writes. A directory that holds no run is left alone."""
        if not self.holds_a_run():
            return
        repeats = [p for p in self.root.glob("repeat-*") if p.name[7:].isdigit()]
        for p in [self.root / f for f in FOLDERS] + repeats:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
        for name in FILES:
            (self.root / name).unlink(missing_ok=True)
            for tmp in self.root.glob(f".{name}.*.tmp"):  # atomic_write's temporaries
                tmp.unlink(missing_ok=True)

    def start(self, config_yaml: str) -> None:
        self.check_free(config_yaml)
        self.root.mkdir(parents=True, exist_ok=True)
        self.clear()  # an old run's checkpoint, arms or report must not outlive it
        write_text(self.root / "config.yaml", config_yaml)

    def metrics_bytes(self) -> int:
        path = self.root / "metrics.jsonl"
        return path.stat().st_size if path.exists() else 0

    def resume(self, state: dict[str, Any]) -> None:
        """Back to the checkpoint: metrics rows written after it are cut (they will be redone),
        the samples are the checkpoint's, the summary of the interrupted attempt goes."""
        path, keep = self.root / "metrics.jsonl", state["metrics_bytes"]
        size = path.stat().st_size if path.exists() else 0
        if size < keep:  # truncate() would pad with zeros: rows were lost or edited
            raise PfreezeError(
                f"{path} is shorter than at its checkpoint ({size} of {keep} bytes): it was "
                "changed or lost", "start the run again with --overwrite")
        with open(path, "r+b") as f:
            f.truncate(keep)
        (self.root / "summary.json").unlink(missing_ok=True)
        self.samples = list(state["samples"])
        self.sample_records = list(state["sample_records"])
        self._write_samples()

    def open_trackers(self, cfg: RunSpec, fresh: bool) -> None:
        """Start the trackers of training.report_to beside metrics.jsonl. One that cannot
        start ends the run; a fresh run then takes back what it wrote, so the corrected retry
        is not refused."""
        t = cfg.training
        try:
            self.loggers += trackers.open_trackers(t.report_to, self.root,
                                                   cfg.model_dump(mode="json"),
                                                   t.run_name or self.root.resolve().name)
        except PfreezeError:
            if fresh:
                self.clear()
            raise

    def append_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Hand rows to every metric sink (metrics.jsonl first)."""
        for logger in self.loggers:
            logger.log(rows)

    def close_metrics(self) -> list[dict[str, str]]:
        """End every sink; what metrics.jsonl could still not take, as a missing output."""
        for logger in self.loggers:
            logger.close()
        n = len(self.jsonl.unwritten)
        return [{"file": "metrics.jsonl", "why": f"{n} rows could not be appended (the disk "
                 "is full)"}] if n else []

    def add_samples(self, arm: str, moment: str, samples: list[Any]) -> None:
        for s in samples:
            self.samples.append(f"=== arm={arm} moment={moment} prompt={s.prompt!r} "
                                f"seed={s.seed} sample={s.index} p={s.p:.3f}\n"
                                f"{s.prompt}{s.text}\n")
            self.sample_records.append({"arm": arm, "moment": moment, "prompt": s.prompt,
                                        "seed": s.seed, "sample": s.index, "p": s.p,
                                        "ids": s.ids, "text": s.text})
        self._write_samples()

    def _write_samples(self) -> None:
        write_text(self.root / "samples.txt", "\n".join(self.samples))
        write_text(self.root / "samples.jsonl",
                   "".join(json.dumps(r, ensure_ascii=False) + "\n"
                           for r in self.sample_records))

    def save_arm(self, strategy: Any, model: nn.Module, tokenizer: Any, pretrained: bool,
                 best: dict[str, Any] | None = None, theta0_hash: str | None = None
                 ) -> list[dict[str, str]]:
        """Write one arm's files; returns what could not be written (file and why) instead of
        raising, so one failed file never costs the others or the summary.

        The safetensors' metadata carries what `pfreeze apply` needs away from the run: the
        arm, the run's config and the hash of the θ₀ the tensors were trained from."""
        d = self.root / "arms" / strategy.name
        meta = {"arm": strategy.name, "description": strategy.describe()}
        if theta0_hash is not None:
            meta["theta0_hash"] = theta0_hash
        if (self.root / "config.yaml").exists():
            meta["config"] = (self.root / "config.yaml").read_text(encoding="utf-8")
        missing: list[dict[str, str]] = []

        def attempt(name: str, nbytes: int, write: Any) -> None:
            try:
                d.mkdir(parents=True, exist_ok=True)
                ensure_space(d, nbytes, f"arms/{strategy.name}/{name}")
                write()
            except (OSError, PfreezeError, ValueError, RuntimeError) as e:
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                missing.append({"file": f"arms/{strategy.name}/{name}",
                                "why": " ".join(why.split())})

        tensors = strategy.trained_tensors(model)
        attempt("trained.safetensors", tensors_bytes(tensors), lambda: atomic_write(
            d / "trained.safetensors", lambda p: save_file(tensors, str(p), meta)))
        if best is not None:  # the trained tensors at the best held-out evaluation
            attempt("best.safetensors", tensors_bytes(best), lambda: atomic_write(
                d / "best.safetensors", lambda p: save_file(best, str(p), meta)))
        for name, nbytes, write in strategy.exports(model, d, pretrained, tokenizer):
            attempt(name, nbytes, write)
        return missing

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.root / "summary.json", summary)


def finished(root: Path) -> dict[str, Any] | None:
    """The summary of a finished run in `root` with all its outputs, else None."""
    s = read_summary(root)
    return s if s and s.get("status") == "finished" and not s.get("missing_outputs") else None


def read_summary(root: Path) -> dict[str, Any] | None:
    """summary.json of the run in `root`, or None where there is none (or it is unreadable)."""
    try:
        return json.loads((Path(root) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, device and git commit: what a reader needs to reproduce a figure."""
    import transformers

    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.machine()} ({torch.get_num_threads()} threads)")
    try:  # "-dirty" when tracked files differ from the commit: figures must say so
        git = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        git = ""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": device.type,
            "device_name": name, "git_hash": git or None}


# A run with repeats > 1 keeps each repeat in repeat-<r>/ (run/repeats.py).
_REPEAT = re.compile(r"repeat-(\d+)")


def repeat_dirs(root: Path) -> list[Path]:
    """`root`'s repeat-<r> folders that hold a run, in repeat order."""
    found = [(int(m.group(1)), p) for p in Path(root).iterdir()
             if p.is_dir() and (m := _REPEAT.fullmatch(p.name)) and (p / "config.yaml").is_file()]
    return [p for _, p in sorted(found)]


def is_repeats_dir(root: Path) -> bool:
    """Whether `root` is the output_dir of a run with repeats > 1."""
    return Path(root).is_dir() and not (Path(root) / "metrics.jsonl").is_file() \
        and bool(repeat_dirs(root))


def _finished_repeat(run: Path) -> dict[str, Any] | None:
    """A repeat's summary if it finished; None otherwise (missing, partial or unreadable)."""
    s = read_summary(run)
    return s if isinstance(s, dict) and s.get("status") == "finished" and s.get("arms") else None


def finished_repeats(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(folder, summary) of each finished repeat in `root`; one line if none has finished."""
    done = [(p, s) for p in repeat_dirs(root) if (s := _finished_repeat(p)) is not None]
    if not done:
        raise PfreezeError(f"no repeat in {root} has finished yet",
                           f"finish them with `pfreeze run --resume {root}`")
    return done
