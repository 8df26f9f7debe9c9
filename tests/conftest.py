"""Shared fixtures: a small corpus, a tiny-run config factory, and one tiny finished run.

Tiny runs use `random:gpt2` (4 blocks, width 64, byte tokenizer), 32-token windows and a few
steps, so a whole run takes a second or two on one CPU core.
"""

from __future__ import annotations

import os

# Tiny models spend their time in thread hand-offs, not arithmetic: on a busy 2-core machine
# torch's intra-op threads make a tiny run ~8x slower. Set before torch is imported; child
# processes (CLI tests) inherit it. An explicit setting by the caller wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import random  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from pfreeze.config import RunConfig, load_config  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

MOBY_CANDIDATES = [
    Path("/work/shared/data/moby-dick/pg2701.txt"),
    Path(__file__).resolve().parents[2] / "shared" / "data" / "moby-dick" / "pg2701.txt",
]
CORPUS_CHARS = 20_000

# Settings of every tiny run; tests add or override with more `--set` items.
TINY = [
    "model.name=random:gpt2",
    "data.block_size=32",
    "training.per_device_train_batch_size=2",
    "training.max_steps=3",
    "training.learning_rate=1e-3",
    "training.logging_steps=1",
    "training.eval_steps=2",
    "training.eval_batches=2",
    "training.device=cpu",
    "training.bf16=false",
    "generation.prompts=[Call me, The whale]",
    "generation.samples_per_prompt=2",
    "generation.max_new_tokens=8",
    "data.top_k=20",
]


def _synthetic_text(n_chars: int) -> str:
    rng = random.Random(0)
    words = ["the", "whale", "sea", "ship", "captain", "ahab", "call", "me", "ishmael", "deck",
             "harpoon", "white", "boat", "crew", "water", "wind", "sail", "of", "and", "a", "to",
             "in", "was", "his"]
    out, size = [], 0
    while size < n_chars:
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(5, 14)))
        line = sentence.capitalize() + ".\n"
        out.append(line)
        size += len(line)
    return "".join(out)


def corpus_text() -> str:
    """~20 kB of Moby-Dick (past the Gutenberg header), or synthetic English if it is absent."""
    for path in MOBY_CANDIDATES:
        if path.is_file():
            text = path.read_text(encoding="utf-8-sig")
            start = text.find("Call me Ishmael.")
            return text[max(start, 0):][:CORPUS_CHARS]
    return _synthetic_text(CORPUS_CHARS)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text(corpus_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_overrides(corpus_file: Path) -> Callable[..., list[str]]:
    """tiny_overrides("training.max_steps=5", ...) -> the full `--set` list of a tiny run."""

    def make(*extra: str) -> list[str]:
        return [*TINY, f"data.corpus={corpus_file}", *extra]

    return make


@pytest.fixture(scope="session")
def make_config(tiny_overrides: Callable[..., list[str]]) -> Callable[..., RunConfig]:
    """make_config("training.max_steps=5", ...) -> a validated RunConfig of a tiny run."""

    def make(*extra: str) -> RunConfig:
        return load_config(None, tiny_overrides(*extra))

    return make


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line)
            for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def rows_of(rows: Sequence[dict[str, Any]], kind: str, arm: str | None = None
            ) -> list[dict[str, Any]]:
    return [r for r in rows if r["kind"] == kind and (arm is None or r["arm"] == arm)]


@dataclass
class TinyRun:
    cfg: RunConfig
    dir: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    loop: Any  # pfreeze.run.loop.Loop after run_loop(): its arms hold the trained models


# The session run: 5 steps, metrics read every 2 steps, evaluation at 0, 2, 4 and 5 (the end).
TINY_RUN_STEPS = 5


@pytest.fixture(scope="session")
def tiny_run(make_config: Callable[..., RunConfig],
             tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    from pfreeze.outputs.files import RunFiles
    from pfreeze.run.loop import Loop
    from pfreeze.run.session import run_loop

    cfg = make_config(f"training.max_steps={TINY_RUN_STEPS}", "training.logging_steps=2")
    out = tmp_path_factory.mktemp("tiny_run") / "run"
    loop = Loop(cfg, RunFiles(out))
    summary = run_loop(loop)
    return TinyRun(cfg, out, summary, read_rows(out), loop)


@pytest.fixture(scope="session")
def lively() -> Callable[[str], Any]:
    """lively("random:llama") -> a tiny model whose greedy output depends on its context.

    Tiny random models at their default init repeat one token whatever the prompt, so a test
    of padding or caching could not fail with them; larger weights make every token count.
    """
    from pfreeze.models.load import load_model

    def make(name: str) -> Any:
        lm = load_model(name, seed=0)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in lm.model.parameters():
                if p.ndim == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        lm.model.eval()
        return lm

    return make
