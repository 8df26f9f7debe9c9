"""Numbers stay sane: a diverging arm stops alone, OOM names its knob, no unsafe unpickling."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from pfreeze.config import load_config
from pfreeze.errors import PfreezeError
from pfreeze.run.loop import Loop
from pfreeze.run.session import run

SRC = Path(__file__).resolve().parents[1] / "src" / "pfreeze"


def _cfg(corpus: Path, *extra: str):
    return load_config(None, [
        # Exact CPU float32 values are asserted (on a GPU, bf16 autocast would change them).
        f"data.corpus={corpus}", "model.name=random:llama", "data.block_size=32",
        "training.device=cpu",
        "training.max_steps=6", "training.logging_steps=2", "training.eval_steps=3",
        "generation.max_new_tokens=4", "generation.samples_per_prompt=1",
        "arms=[{kind: full}, {kind: plan, select: 'layers=3: roles=q'}]", *extra,
    ])


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    p = tmp_path / "text.txt"
    p.write_text("It is not down in any map; true places never are. " * 60)
    return p


def test_nan_loss_stops_only_that_arm(corpus: Path, tmp_path: Path) -> None:
    # SGD with an absurd step size diverges the full arm; the plan arm (one q matrix) survives.
    cfg = _cfg(corpus, "training.optim=sgd", "training.learning_rate=1e12",
               "training.max_grad_norm=null", "training.momentum=0")
    summary = run(cfg, tmp_path / "out")
    full, plan = summary["arms"]["full"], summary["arms"]["plan"]
    assert full["status"].startswith("stopped: loss became nan")
    assert full["steps"] < 6 and full["p_after"]["mean"] is None
    assert plan["status"] == "finished" and plan["steps"] == 6
    assert plan["last_loss"] is not None and plan["integrity"]["ok"]
    text = (tmp_path / "out" / "summary.json").read_text()
    assert "NaN" not in text  # strict JSON: non-finite values are written as null
    json.loads(text)


def test_out_of_memory_names_the_knob(corpus: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(Loop, "train_step", boom)
    with pytest.raises(PfreezeError, match="out of memory in arm 'full' at step 1") as e:
        run(_cfg(corpus), tmp_path / "out")
    assert "per_device_train_batch_size" in str(e.value) and "\n" not in str(e.value)


def test_every_torch_load_is_weights_only() -> None:
    calls = [(p.name, m) for p in SRC.rglob("*.py")
             for m in re.findall(r"torch\.load\([^)]*\)", p.read_text())]
    assert calls, "expected the checkpoint loader to use torch.load"
    for name, call in calls:
        assert "weights_only=True" in call, f"{name}: {call}"


def test_batch_larger_than_the_corpus_is_refused(corpus: Path, tmp_path: Path) -> None:
    cfg = _cfg(corpus, "training.per_device_train_batch_size=512")
    with pytest.raises(PfreezeError, match="larger than the whole training text"):
        run(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "config.yaml").exists()  # nothing half-started


def test_zero_steps_is_a_config_error(corpus: Path) -> None:
    with pytest.raises(PfreezeError, match="training.max_steps"):
        _cfg(corpus, "training.max_steps=0")


def test_unknown_model_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pfreeze.models.load import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: nothing to fall back on
    with pytest.raises(PfreezeError, match="cannot load model 'no-such-org/no-such-model'") as e:
        load_model("no-such-org/no-such-model")
    assert "random:<family>" in str(e.value)


def test_unsupported_architecture_is_named() -> None:
    from types import SimpleNamespace

    from pfreeze.models.load import family_of

    fake = SimpleNamespace(config=SimpleNamespace(model_type="t5"))
    with pytest.raises(PfreezeError, match="architecture 't5' is not supported") as e:
        family_of(fake)  # type: ignore[arg-type]
    assert "pfreeze families" in str(e.value)  # where the supported families are listed
    assert "add an entry to pfreeze.models.families.FAMILIES" in str(e.value)  # the fix


def test_resume_refuses_other_options(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "config.yaml").write_text("model: {name: random:gpt2}\n")
    cmd = [sys.executable, "-m", "pfreeze.cli", "run", "--resume", str(tmp_path),
           "--set", "training.max_steps=5"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--resume takes the run's own config.yaml" in res.stderr


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])  # both capture graphs
def test_cuda_graphs_with_gradient_accumulation_are_refused(corpus: Path, mode: str) -> None:
    cfg = _cfg(corpus, "training.torch_compile=true", f"training.torch_compile_mode={mode}",
               "training.gradient_accumulation_steps=2")
    with pytest.raises(PfreezeError, match=f"{mode} cannot be combined with gradient_accum"):
        Loop(cfg, files=None)  # type: ignore[arg-type]
    # (auto picks no graphs with accumulation: test_fastpath's resolve_compile_mode test)


def test_resume_without_a_checkpoint_says_so(corpus: Path, tmp_path: Path) -> None:
    cfg = _cfg(corpus)
    run(cfg, tmp_path / "out")  # save_steps=0: never checkpointed
    (tmp_path / "out" / "summary.json").unlink()  # as if killed before its summary
    with pytest.raises(PfreezeError, match="has no checkpoint yet") as e:
        run(cfg, tmp_path / "out", resume=True)
    assert "--overwrite" in str(e.value)
