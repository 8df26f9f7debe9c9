"""Kill a run with SIGKILL after a checkpoint, resume it, and get the uninterrupted result."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

OVERRIDES = [
    "model.name=random:llama", "data.block_size=32", "training.max_steps=10",
    "training.device=cpu",  # bit-exact resume is asserted on the CPU, where CI runs
    "training.logging_steps=2", "training.eval_steps=4", "training.save_steps=4",
    "training.weight_decay=0.1", "training.warmup_steps=2", "generation.max_new_tokens=6",
    "generation.samples_per_prompt=1", "generation.prompts=[Call me]",
    "arms=[{kind: full}, {kind: plan, select: 'layers=2: roles=q,k,v'}]",
]

# Runs a pfreeze experiment in a child process; with KILL_AT it SIGKILLs itself after that
# many steps (counted over the turns of a sequential run).
DRIVER = """
import os, signal, sys
from pfreeze.config import load_config
from pfreeze.run.session import run
corpus, out, kill_at, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
overrides = sys.argv[5:] + [f"data.corpus={corpus}"]
cfg = load_config(None, overrides)
steps = []
def on_step(step, losses):
    steps.append(step)
    if len(steps) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
run(cfg, out, overwrite=not resume, on_step=on_step, resume=resume)
"""


def _run(corpus: Path, out: Path, kill_at: int = -1, resume: bool = False,
         extra: tuple[str, ...] = ()) -> int:
    cmd = [sys.executable, "-c", DRIVER, str(corpus), str(out), str(kill_at), str(int(resume))]
    return subprocess.run(cmd + OVERRIDES + list(extra), capture_output=True,
                          timeout=300).returncode


def _train_rows(out: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    keys = ("step", "arm", "loss", "val_loss", "dw", "dw0", "batch_hash")
    return [tuple(r.get(k) for k in keys) for r in rows]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "text.txt"
    p.write_text("Call me Ishmael. Some years ago, never mind how long precisely. " * 80)
    return p


# epochs: aligned chunks (9 steps per epoch at batch 16, so the resumed part crosses into
# epoch 2) and the plan arm's frozen prefix cached, rebuilt empty after the resume.
# sequential: killed at step 6 of the second arm's turn (the first arm's files written).
@pytest.mark.parametrize("extra", [(), ("data.sampling=epochs",
                                        "training.per_device_train_batch_size=16"),
                                   ("arms_placement=sequential",)],
                         ids=["random", "epochs", "sequential"])
def test_sigkill_then_resume_matches_uninterrupted(corpus: Path, tmp_path: Path,
                                                   extra: tuple[str, ...]) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _run(corpus, straight, extra=extra) == 0
    # really killed, after the step-4 checkpoint (of the second arm's turn if sequential)
    sequential = "arms_placement=sequential" in extra
    assert _run(corpus, killed, kill_at=16 if sequential else 6, extra=extra) == -9
    state = json.loads((killed / "checkpoint" / "state.json").read_text())
    assert (state["step"], (state["sequential"] or {}).get("turn")) == \
        (4, 1 if sequential else None)
    assert not (killed / "summary.json").exists()
    assert _run(corpus, killed, resume=True, extra=extra) == 0
    for arm in ("full", "plan"):
        a = load_file(str(straight / "arms" / arm / "trained.safetensors"))
        b = load_file(str(killed / "arms" / arm / "trained.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{arm}:{k} differs after resume"
    assert _train_rows(straight) == _train_rows(killed)
    s1 = json.loads((straight / "summary.json").read_text())
    s2 = json.loads((killed / "summary.json").read_text())
    for arm in ("full", "plan"):
        for key in ("last_loss", "mean_loss", "val_loss_best", "val_loss_best_step", "p_after"):
            assert s1["arms"][arm][key] == s2["arms"][arm][key], key
        assert s2["arms"][arm]["integrity"]["ok"]
    if sequential:
        assert s2["execution"]["arms_placement"] == "sequential"
    elif extra:  # the cached arm really read from its cache (the resumed one starts it empty)
        assert s1["arms"]["plan"]["prefix_cache"]["hits"] > 0
        assert s2["arms"]["plan"]["prefix_cache"]["blocks_cached"] == 2


def test_resume_after_an_early_stop_keeps_the_stream_and_the_stop(corpus: Path,
                                                                  tmp_path: Path) -> None:
    # The full arm early-stops (patience 1) before the kill; arm 0 being stopped must neither
    # rewind the shared batch stream nor bring the arm back to life on resume.
    extra = ("training.learning_rate=3e-2", "training.early_stopping_patience=1",
             "training.eval_steps=2", "training.save_steps=2", "training.max_steps=10")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _run(corpus, straight, extra=extra) == 0
    s1 = json.loads((straight / "summary.json").read_text())
    assert s1["arms"]["full"]["status"].startswith("stopped: early stop")  # the premise
    assert _run(corpus, killed, kill_at=7, extra=extra) == -9
    assert _run(corpus, killed, resume=True, extra=extra) == 0
    assert _train_rows(straight) == _train_rows(killed)
    s2 = json.loads((killed / "summary.json").read_text())
    for arm in ("full", "plan"):
        for key in ("status", "steps", "last_loss", "val_loss_after", "p_after"):
            assert s1["arms"][arm][key] == s2["arms"][arm][key], (arm, key)


def _after(out: Path) -> list[str]:
    """The 'after' samples of samples.txt, headers and texts."""
    blocks = (out / "samples.txt").read_text(encoding="utf-8").split("=== ")
    return [b for b in blocks if " moment=after " in b]


def test_resume_keeps_what_auto_resolved_to_when_the_run_started(corpus: Path,
                                                                 tmp_path: Path) -> None:
    """A run started on a GPU samples p with pfreeze's sampler: resumed anywhere, its "after"
    samples must come from that sampler too, whatever `auto` resolves to on the new machine."""
    out, straight = tmp_path / "run", tmp_path / "straight"
    assert _run(corpus, straight, extra=("generation.decoder=pfreeze",)) == 0
    assert _run(corpus, out, kill_at=5) == -9
    state_file = out / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["execution"] == {"attention": "model", "decoder": "generate",
                                  "compile_mode": "default",
                                  "compiled": False}  # what auto is on the CPU
    state["execution"]["decoder"] = "pfreeze"  # as if started where auto picked it
    state_file.write_text(json.dumps(state))
    assert _run(corpus, out, resume=True) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["execution"]["decoder"] == "pfreeze"
    # Drawn by pfreeze's sampler from the same weights: the uninterrupted run's samples.
    assert _after(out) == _after(straight) and len(_after(out)) == 2


def _pin(loop, saved: dict) -> None:  # noqa: ANN001
    """As a resume does: keep the runtime the checkpoint recorded, where it can run here."""
    loop.set_runtime(loop.rt.resumed(saved, loop.t, loop.arms[0].model,
                                     loop.cfg.data.block_size, loop.warn))


def test_a_pinned_setting_that_cannot_run_here_falls_back_but_the_decoder_stays(
        corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pfreeze.run.step
    from pfreeze.config import load_config
    from pfreeze.models.load import load_model
    from pfreeze.run.loop import Loop

    def built() -> Loop:
        cfg = load_config(None, [*OVERRIDES, f"data.corpus={corpus}",
                                 "training.torch_compile=true"])
        loop = Loop(cfg, None)  # type: ignore[arg-type]
        lm = load_model("random:llama", seed=0)
        loop.build_arms(lm.model, lm.family)
        return loop

    loop = built()
    warned: list[str] = []
    loop.warn = warned.append  # type: ignore[method-assign]
    modes: list[str] = []
    compile_step = pfreeze.run.step.compile_step
    monkeypatch.setattr(pfreeze.run.step, "compile_step",
                        lambda m, mode: modes.append(mode) or compile_step(m, mode))
    before = [a.step_fn for a in loop.arms]
    _pin(loop, {"attention": "cudnn", "decoder": "pfreeze", "compile_mode": "max-autotune",
                "compiled": True})
    assert (loop.rt.attention, loop.rt.decoder, loop.rt.compile_mode) == (
        "model", "pfreeze", "max-autotune")
    assert len(warned) == 1 and "not cudnn" in warned[0]
    assert modes == ["max-autotune"] * len(loop.arms)
    for arm, old in zip(loop.arms, before, strict=True):  # re-wrapped, same module inside
        assert arm.step_fn is not old and arm.step_fn._orig_mod.module is old._orig_mod.module
    runnable = built()  # a pinned kernel that can run here is kept
    _pin(runnable, {"attention": "sdpa", "decoder": "generate", "compile_mode": "default",
                    "compiled": True})
    assert runnable.rt.attention == "sdpa"


def test_a_resumed_run_keeps_its_compilation_choice(corpus: Path) -> None:
    """A run keeps the compilation choice it started with, recorded in the checkpoint.
    Compiled as build_arms would: single-plan arms only, a cached arm's upper blocks; never
    CUDA graphs with gradient accumulation; not on a CPU when the choice was auto's."""
    from pfreeze.config import load_config
    from pfreeze.data.corpus import BatchStream
    from pfreeze.models.load import load_model
    from pfreeze.run.loop import Loop

    warned: list[str] = []

    def built(*extra: str) -> Loop:
        cfg = load_config(None, [
            *OVERRIDES, f"data.corpus={corpus}", "data.sampling=epochs",
            "arms=[{kind: full}, {kind: plan, select: 'layers=2: roles=q,k,v'},"
            " {kind: unfreeze, every: 2}]", *extra])
        loop = Loop(cfg, None)  # type: ignore[arg-type]
        loop.stream = BatchStream(list(range(400)), 32, 2, 0, "epochs")
        lm = load_model("random:llama", seed=0)
        loop.build_arms(lm.model, lm.family)
        loop.rt = dataclasses.replace(loop.rt, device=torch.device("cuda"))  # as if on a GPU
        loop.warn = warned.append
        return loop

    loop = built()
    full, cached, unfreeze = loop.arms
    assert cached.prefix is not None and len(unfreeze.strategy.plans) > 1
    assert not loop.rt.compiled and all(a.step_fn is None for a in loop.arms)
    _pin(loop, {**loop.rt.settings(), "compiled": True})  # started where auto compiled
    assert loop.rt.compiled and unfreeze.step_fn is None
    assert full.step_fn._orig_mod.module is full.model
    assert cached.step_fn._orig_mod.module is cached.prefix.upper
    _pin(loop, {**loop.rt.settings(), "compiled": False})
    assert not loop.rt.compiled and all(a.step_fn is None for a in loop.arms)

    # CUDA graphs are never pinned onto gradient accumulation (Loop refuses them at start).
    acc = built("training.max_steps=500", "training.gradient_accumulation_steps=2")
    _pin(acc, {**acc.rt.settings(), "compiled": True, "compile_mode": "reduce-overhead"})
    assert acc.rt.compiled and acc.rt.compile_mode == "default"
    assert "gradient accumulation" in warned[-1]

    # Resumed on a CPU, auto's choice to compile is not kept (minutes of C++ for little).
    cpu = built()
    cpu.rt = dataclasses.replace(cpu.rt, device=torch.device("cpu"))
    _pin(cpu, {**cpu.rt.settings(), "compiled": True})
    assert not cpu.rt.compiled and "resumed eager" in warned[-1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled CUDA-graph steps need a GPU")
def test_a_compiled_gpu_run_resumes_compiled_with_the_same_stream(corpus: Path,
                                                                 tmp_path: Path) -> None:
    """Killed and resumed on a GPU, a compiled run (CUDA graphs, a cached arm) records the same
    compiled execution, replays the same batches, finishes with the integrity audit passing,
    and its losses and weights agree with the uninterrupted run's to bf16 tolerance (GPU
    kernels need not be bit-reproducible). At this run's learning rate those tolerances are
    wider than ten steps move the weights, so they would not catch a resume that lost its
    state: bit-exact resume is asserted on the CPU (test_sigkill_then_resume_...)."""
    extra = ("training.device=cuda", "training.torch_compile=true", "data.sampling=epochs",
             "training.per_device_train_batch_size=16")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _run(corpus, straight, extra=extra) == 0
    assert _run(corpus, killed, kill_at=6, extra=extra) == -9
    assert _run(corpus, killed, resume=True, extra=extra) == 0
    s1 = json.loads((straight / "summary.json").read_text())
    s2 = json.loads((killed / "summary.json").read_text())
    settings = ("attention", "decoder", "compile_mode", "compiled")  # not the memory peak
    assert [s2["execution"][k] for k in settings] == [s1["execution"][k] for k in settings]
    assert s2["execution"]["compiled"] and s2["execution"]["compile_mode"] == "reduce-overhead"
    rows1, rows2 = _train_rows(straight), _train_rows(killed)
    assert [(r[0], r[1], r[-1]) for r in rows1] == [(r[0], r[1], r[-1]) for r in rows2]
    for r1, r2 in zip(rows1, rows2, strict=True):
        if r1[2] is not None:
            assert r2[2] == pytest.approx(r1[2], rel=2e-2), r1[:2]
    for arm in ("full", "plan"):
        assert s2["arms"][arm]["integrity"]["ok"] and s2["arms"][arm]["status"] == "finished"
        a = load_file(str(straight / "arms" / arm / "trained.safetensors"))
        b = load_file(str(killed / "arms" / arm / "trained.safetensors"))
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=2e-2, atol=2e-3)
    # The straight run read its cache; the resumed one rebuilt it empty after step 4 and,
    # one step into epoch 2, has had few whole batches it has seen since.
    assert s1["arms"]["plan"]["prefix_cache"]["hits"] > 0
    assert s2["arms"]["plan"]["prefix_cache"]["blocks_cached"] == 2
