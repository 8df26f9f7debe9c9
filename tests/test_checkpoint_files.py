"""The checkpoint files (pfreeze.outputs.checkpoint) given explicitly: a diverged arm keeps its
last good files, its shards included."""

from __future__ import annotations

from pathlib import Path

import torch

from pfreeze.outputs import checkpoint
from pfreeze.outputs.checkpoint import ArmCheckpoint

RNG = {"cpu": torch.zeros(2, dtype=torch.uint8)}


def _shards(root: Path, text: str) -> Path:
    d = root / ".shards" / "arm0.dcp"
    d.mkdir(parents=True)
    (d / "shard.bin").write_text(text)
    return d


def _state(step: int) -> dict:
    return {"step": step, "arms": [{"name": "plan"}]}


def test_a_diverged_sharded_arm_keeps_its_last_good_shards(tmp_path: Path) -> None:
    good = ArmCheckpoint({}, {"shards": "arm0.dcp"})
    checkpoint.save(tmp_path, [good], RNG, _state(3), {"arm0.dcp": _shards(tmp_path, "good")})
    bad = ArmCheckpoint({}, {"shards": "arm0.dcp"}, keep_previous=True)
    new = _shards(tmp_path, "nan")
    saved = checkpoint.save(tmp_path, [bad], RNG, _state(6), {"arm0.dcp": new})
    assert (saved / "arm0.dcp" / "shard.bin").read_text() == "good"
    assert checkpoint.folder(tmp_path) == saved and not new.exists()
    # A finite arm's new shards replace the old ones.
    fine = _shards(tmp_path, "step 9")
    saved = checkpoint.save(tmp_path, [good], RNG, _state(9), {"arm0.dcp": fine})
    assert (saved / "arm0.dcp" / "shard.bin").read_text() == "step 9"
