"""The run directory: every file a run writes, and the rule that none is ever half-written.

    config.yaml        the resolved config (written first: a run describes itself)
    metrics.jsonl      one row per step and arm, plus eval rows (appended; a torn last line
                       from a killed run is skipped by readers)
    samples.txt        generated text, per arm, before and after
    summary.json       everything the report needs (written last, atomically)
    arms/<name>/       trained.safetensors (only tensors that trained), adapter/ for LoRA,
                       model/ with save_pretrained when asked
"""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from pfreeze.atomic import atomic_write, write_json, write_text
from pfreeze.errors import PfreezeError


class RunFiles:
    def __init__(self, root: Path, overwrite: bool = False) -> None:
        self.root = Path(root)
        self.overwrite = overwrite
        self.samples: list[str] = []

    def check_free(self, config_yaml: str) -> None:
        """Refuse to write into a directory that holds another run (unless overwriting)."""
        old = self.root / "config.yaml"
        if old.exists() and not self.overwrite:
            same = old.read_text(encoding="utf-8") == config_yaml
            raise PfreezeError(
                f"{self.root} already holds {'this' if same else 'a different'} run",
                "pass another --output-dir, --overwrite to replace it"
                + (", or --resume to continue it" if same else ""),
            )

    def start(self, config_yaml: str) -> None:
        self.check_free(config_yaml)
        old = self.root / "config.yaml"
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in ("metrics.jsonl", "summary.json", "samples.txt"):
            (self.root / stale).unlink(missing_ok=True)
        write_text(old, config_yaml)

    def resume(self, step: int, samples: list[str]) -> None:
        """Drop metrics rows written after the checkpoint at `step`; they will be redone."""
        path = self.root / "metrics.jsonl"
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the torn line of a killed write
            if row.get("step", 0) <= step:
                kept.append(line + "\n")
        write_text(path, "".join(kept))
        (self.root / "summary.json").unlink(missing_ok=True)
        self.samples = list(samples)

    def append_metrics(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            with open(self.root / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))

    def add_samples(self, arm: str, moment: str, samples: list[Any]) -> None:
        for s in samples:
            self.samples.append(f"=== arm={arm} moment={moment} prompt={s.prompt!r} "
                                f"seed={s.seed} sample={s.index} p={s.p:.3f}\n"
                                f"{s.prompt}{s.text}\n")
        write_text(self.root / "samples.txt", "\n".join(self.samples))

    def save_arm(self, strategy: Any, model: nn.Module, tokenizer: Any, pretrained: bool,
                 best: dict[str, Any] | None = None) -> None:
        d = self.root / "arms" / strategy.name
        d.mkdir(parents=True, exist_ok=True)
        tensors = strategy.trained_tensors(model)
        meta = {"arm": strategy.name, "description": strategy.describe()}
        atomic_write(d / "trained.safetensors", lambda p: save_file(tensors, str(p), meta))
        if best is not None:  # the trained tensors at the best held-out evaluation
            atomic_write(d / "best.safetensors", lambda p: save_file(best, str(p), meta))
        strategy.export(model, d, pretrained, tokenizer)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.root / "summary.json", summary)


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
