"""Checkpoint files: everything a run needs to continue exactly where it was killed.

    checkpoint/state.json         format, config hash, step, per-arm metrics so far and
                                  scheduler states, samples, θ₀ hash, batch hashes, runtime
    checkpoint/arm<i>.safetensors every tensor the arm ever trains, the Freezer's references
                                  for partly frozen tensors, its best-point tensors
    checkpoint/rng.safetensors    the batch stream's and torch's random states
    checkpoint/arm<i>.optim.pt    the optimizer state (tensors and plain values only: it is
                                  loaded with weights_only=True, never unpickling code)

The arms are those state.json lists, in its order: every arm of a together run; the arm of the
turn alone (as arm0), or none between two turns, in a sequential run (pfreeze.run.turns).

The folder is written under a temporary name and swapped in with renames, so a kill during a
save leaves the previous checkpoint intact. Weights are restored on top of a freshly loaded θ₀,
so frozen tensors never need to be stored. What goes in is the run's to gather
(pfreeze.run.session); this module only writes and reads it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pfreeze.atomic import write_json
from pfreeze.errors import PfreezeError
from pfreeze.outputs.files import ensure_space

CKPT = "checkpoint"
# The layout of state.json and the files beside it; a checkpoint of another format is refused.
FORMAT = 2


@dataclass
class ArmCheckpoint:
    tensors: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # optimizer.state_dict()
    # A diverged arm keeps its last good files rather than its non-finite ones; its metrics
    # and status (in state.json) are current, so a resumed run knows it stopped.
    keep_previous: bool = False


def _nbytes(arms: list[ArmCheckpoint]) -> int:
    tensors = [t for a in arms for t in a.tensors.values()]
    tensors += [t for a in arms for s in a.optimizer.get("state", {}).values()
                for t in s.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def save(root: Path, arms: list[ArmCheckpoint], rng: dict[str, torch.Tensor],
         state: dict[str, Any], shards: dict[str, Path] | None = None) -> Path:
    """Write a complete checkpoint of `state` (with "step") next to the run in `root`.
    `shards`: folders already written (a sharded arm's torch.distributed.checkpoint), moved in
    under their names so they swap in with the rest."""
    tmp, final, old = root / f".{CKPT}.tmp", root / CKPT, root / f".{CKPT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    ensure_space(root, _nbytes(arms), f"the checkpoint at step {state['step']}")
    tmp.mkdir(parents=True)
    previous = folder(root)  # after a kill mid-swap, the complete one may be .old
    kept, shards = _names(previous), dict(shards or {})
    try:
        for i, arm in enumerate(arms):
            # The previous files of this arm (a sequential run's arm0 was another arm's), and
            # its previous shards in place of the new ones.
            if (arm.keep_previous and kept[i:i + 1] == [state["arms"][i].get("name")]
                    and (previous / f"arm{i}.safetensors").exists()):
                for suffix in (".safetensors", ".optim.pt"):
                    shutil.copy2(previous / f"arm{i}{suffix}", tmp / f"arm{i}{suffix}")
                if (previous / f"arm{i}.dcp").is_dir():
                    shutil.copytree(previous / f"arm{i}.dcp", tmp / f"arm{i}.dcp")
                    if (fresh := shards.pop(f"arm{i}.dcp", None)) is not None:
                        shutil.rmtree(fresh, ignore_errors=True)
                continue
            save_file(arm.tensors, str(tmp / f"arm{i}.safetensors"))
            torch.save(arm.optimizer, tmp / f"arm{i}.optim.pt")
        for name, src in shards.items():
            shutil.move(str(src), str(tmp / name))
        save_file(rng, str(tmp / "rng.safetensors"))
        write_json(tmp / "state.json", {"format": FORMAT, **state})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Swap in: a complete checkpoint exists at every moment (final, or old while the new one
    # is renamed into place; .old alone is removed only once final is there).
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def folder(root: Path) -> Path | None:
    """The complete checkpoint: normally checkpoint/, or the old one if a kill hit the swap."""
    for d in (root / CKPT, root / f".{CKPT}.old"):
        if (d / "state.json").exists():
            return d
    return None


def exists(root: Path) -> bool:
    return folder(root) is not None


def _state(d: Path | None) -> dict[str, Any]:
    return json.loads((d / "state.json").read_text(encoding="utf-8")) if d else {}


def _names(d: Path | None) -> list[str | None]:
    """The arms whose files checkpoint folder `d` holds, in their order (by their names)."""
    try:
        return [a.get("name") for a in _state(d).get("arms", [])]
    except (OSError, ValueError):
        return []


def placement(root: Path) -> str:
    """The arms' placement the checkpoint in `root` was made in (sequential: one arm's turn)."""
    return _state(folder(root)).get("placement") or "together"


def load(root: Path, device: torch.device, which: list[int] | None = None
         ) -> tuple[dict[str, Any], list[tuple[dict[str, torch.Tensor], dict[str, Any]]],
                    dict[str, torch.Tensor]]:
    """state.json, each arm's (tensors, optimizer state) and the random states, the arms as
    state.json lists them; a checkpoint of another format is refused with the fix. `which`:
    only those arms are read (the others come back empty), as a rank that trains some of the
    arms needs."""
    d = folder(root)
    if d is None:
        raise PfreezeError(f"{root} has no checkpoint", "start the run with --overwrite")
    state = _state(d)
    n_arms = len(state.get("arms", []))
    if state.get("format") != FORMAT:
        raise PfreezeError(
            f"the checkpoint in {root} was written by pfreeze "
            f"{state.get('pfreeze_version', 'before 0.1.0')} in another format "
            f"({state.get('format', 1)}; this version reads {FORMAT})",
            "start the run again with --overwrite",
        )
    arms = [(load_file(str(d / f"arm{i}.safetensors")),
             torch.load(d / f"arm{i}.optim.pt", map_location=device, weights_only=True))
            if which is None or i in which else ({}, {}) for i in range(n_arms)]
    return state, arms, load_file(str(d / "rng.safetensors"))
