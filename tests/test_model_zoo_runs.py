"""A short paired run (full vs `layers=50%: roles=q,k,v`) completes on a tiny model of every
family, frozen-prefix cache and sampler wherever the family has them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pfreeze.config import RunConfig
from pfreeze.models.tiny import TINY
from pfreeze.run.session import run


@pytest.mark.parametrize("name", ["gpt2", "gpt-neo", "gpt-neox", "llama", *TINY])
def test_a_paired_run_completes(name: str, make_config: Callable[..., RunConfig],
                                tmp_path: Path) -> None:
    cfg = make_config(f"model.name=random:{name}", "training.max_steps=2",
                      "training.eval_steps=2", "generation.samples_per_prompt=1",
                      "generation.max_new_tokens=2",
                      "arms=[{kind: full}, {kind: plan, select: 'layers=50%: roles=q,k,v'}]")
    summary = run(cfg, tmp_path / "run")
    arms = summary["arms"]
    assert set(arms) == {"full", "plan"}
    assert arms["plan"]["trainable_params"] < arms["full"]["trainable_params"]
