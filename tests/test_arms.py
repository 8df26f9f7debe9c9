"""Arms beyond full/plan: schedules (t0, gradual, LISA), LoRA, SNR, repeats, best point."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pfreeze.config import load_config
from pfreeze.models.load import load_model
from pfreeze.outputs.files import RunFiles
from pfreeze.plan.rank import snr_score, snr_scores, top_selector
from pfreeze.run import moments
from pfreeze.run.arms.base import make_arm
from pfreeze.run.arms.lisa import LisaArm
from pfreeze.run.arms.unfreeze import UnfreezeArm
from pfreeze.run.loop import Loop
from pfreeze.run.session import run, run_loop

# training.device=cpu: exact float32 values are asserted (a GPU would autocast to bf16).
BASE = ["model.name=random:llama", "data.block_size=32", "training.logging_steps=1",
        "training.device=cpu",
        "training.learning_rate=1e-2", "generation.max_new_tokens=4",
        "generation.samples_per_prompt=1", "generation.prompts=[Call me]"]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    p = tmp_path / "text.txt"
    p.write_text("Call me Ishmael. Some years ago, never mind how long precisely. " * 80)
    return p


def _cfg(corpus: Path, *extra: str):
    return load_config(None, [*BASE, f"data.corpus={corpus}", *extra])


def _rows(out: Path, arm: str) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train" and r["arm"] == arm]


def test_t0_arm_is_frozen_before_t0_and_trains_after(corpus: Path, tmp_path: Path) -> None:
    cfg = _cfg(corpus, "training.max_steps=6", "training.eval_steps=6",
               "arms=[{kind: schedule, name: t0, "
               "phases: [{start: 3, select: 'layers=3: roles=q'}]}]")
    summary = run(cfg, tmp_path / "out")
    rows = _rows(tmp_path / "out", "t0")
    # Steps 1-3 are t < t0 = 3 (0-based): nothing may move, bit for bit.
    assert [r["dw0"]["L3.q"] for r in rows[:3]] == [0.0, 0.0, 0.0]
    assert all(r["dw"]["L3.q"] > 0 for r in rows[3:])
    assert all(r["dw0"][k] == 0.0 for r in rows for k in r["dw0"] if k != "L3.q")
    arm = summary["arms"]["t0"]
    assert arm["trainable_params"] == 64 * 64 and arm["integrity"]["ok"]


def test_gradual_unfreeze_phases_by_hand() -> None:
    cfg = UnfreezeArm(name="u", every=2, start_layers=1, within="roles=q")
    phases = make_arm(cfg, "llama", max_steps=6).phases(n_layers=4)
    assert phases == [(0, "layers=-1: roles=q"), (2, "layers=-2: roles=q"),
                      (4, "layers=-3: roles=q")]


def test_lisa_picks_the_seeded_blocks() -> None:
    cfg = LisaArm(name="lisa", gamma=2, interval=5, seed=7, always="roles=norm")
    phases = make_arm(cfg, "llama", max_steps=12).phases(n_layers=6)
    gen = torch.Generator().manual_seed(7)
    expected = []
    for start in (0, 5, 10):
        blocks = sorted(torch.randperm(6, generator=gen)[:2].tolist())
        expected.append((start, f"layers={blocks[0]},{blocks[1]}; roles=norm"))
    assert phases == expected
    other = make_arm(cfg.model_copy(update={"seed": 8}), "llama", max_steps=12).phases(6)
    assert other != phases


def test_lora_keeps_base_bit_identical_and_adapter_reloads(corpus: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    cfg = _cfg(corpus, "training.max_steps=3", "training.eval_steps=3",
               "arms=[{kind: lora, select: 'roles=q,v', r: 4}]")
    loop = Loop(cfg, RunFiles(tmp_path / "out"))
    summary = run_loop(loop)
    arm = summary["arms"]["lora"]
    base_total = load_model("random:llama", seed=cfg.training.seed).model
    n_base = sum(p.numel() for p in base_total.parameters())
    assert arm["integrity"]["ok"] and arm["integrity"]["checked_elements"] == n_base
    assert arm["theta0_hash"] == summary["theta0_hash"]  # θ₀ is the base, before adapters
    # 4 blocks x r=4 x (A: r x in, B: out x r): q is 64 -> 64, v is 64 -> 32 (GQA).
    assert arm["trainable_params"] == 4 * 4 * ((64 + 64) + (64 + 32))
    trained = loop.arms[0].model.eval()
    fresh = load_model("random:llama", seed=cfg.training.seed).model
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "out" / "arms" / "lora" / "adapter"))
    x = torch.arange(20).view(1, 20)
    with torch.no_grad():
        assert torch.equal(trained(input_ids=x).logits, reloaded.eval()(input_ids=x).logits)
        base_logits = load_model("random:llama", seed=cfg.training.seed).model(input_ids=x).logits
    assert not torch.equal(base_logits, trained(input_ids=x).logits)  # the adapter did train


def test_snr_score_matches_a_hand_computation() -> None:
    s = np.array([10.0, 5.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    v, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    w = torch.tensor(u @ np.diag(s) @ v.T, dtype=torch.float32)
    # By hand: quartiles of s (linear interpolation) 0.675 and 2.0; noise std IQR/1.349;
    # square matrix: beta = 1, threshold = 2 * sigma ~= 1.964; signal = 10 + 5 = 15;
    # noise = 1 + 0.9 + ... + 0.5 = 4.5.
    q1, q3 = np.percentile(s, [25, 75])
    assert (q1, q3) == pytest.approx((0.675, 2.0))
    tau = (q3 - q1) / 1.349 * 2
    assert 1.0 < tau < 5.0
    snr, score = snr_score(w)
    assert snr == pytest.approx(15 / 4.5, rel=1e-4)
    assert score == pytest.approx(15 / 4.5 / 10, rel=1e-4)


def test_snr_selector_takes_the_top_share_per_matrix_type() -> None:
    lm = load_model("random:gpt2")
    scores = snr_scores(lm.model, lm.family, roles={"q", "k", "v", "o"})
    assert {m.role for m in scores} == {"q", "k", "v", "o"} and len(scores) == 16
    sel = top_selector(scores, 25)  # 4 blocks per type: the best one of each
    assert len(sel.split("; ")) == 4
    best_q = max((m for m in scores if m.role == "q"), key=lambda m: m.score)
    assert f"re={best_q.name.replace('.', chr(92) + '.')} roles=q" in sel


def test_repeats_give_n_rows_per_arm_and_paired_differences(corpus: Path, tmp_path: Path) -> None:
    cfg = _cfg(corpus, "training.max_steps=2", "training.eval_steps=2", "repeats=2",
               "arms=[{kind: full}, {kind: plan, select: 'layers=3: roles=q'}]")
    agg = run(cfg, tmp_path / "out")
    s0 = json.loads((tmp_path / "out" / "repeat-0" / "summary.json").read_text())
    s1 = json.loads((tmp_path / "out" / "repeat-1" / "summary.json").read_text())
    assert s0["theta0_hash"] != s1["theta0_hash"]  # seed + r re-initialises the random model
    for arm in ("full", "plan"):
        fig = agg["arms"][arm]["figures"]["last_loss"]
        assert fig["n"] == 2
        assert fig["values"] == [s0["arms"][arm]["last_loss"], s1["arms"][arm]["last_loss"]]
    diff = agg["arms"]["plan"]["vs_reference"]["last_loss"]["values"]
    assert diff == pytest.approx([s["arms"]["plan"]["last_loss"] - s["arms"]["full"]["last_loss"]
                                  for s in (s0, s1)])
    assert "Paired difference" in (tmp_path / "out" / "repeats.md").read_text()


def test_early_stopping_keeps_the_best_weights(corpus: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Scripted held-out losses per evaluation (steps 0, 1, 2, 3): best at step 1, then worse.
    script = iter([5.0, 5.0, 4.0, 4.0, 4.5, 4.5, 4.6, 4.6, 9.0, 9.0])
    monkeypatch.setattr(moments, "mean_loss", lambda *a, **k: next(script))
    # logging_steps=4: the stop at step 3 falls between two reads of the device values.
    cfg = _cfg(corpus, "training.max_steps=8", "training.eval_steps=1",
               "training.early_stopping_patience=2", "training.keep_best=true",
               "training.logging_steps=4", "arms=[{kind: full}]")
    summary = run(cfg, tmp_path / "out")
    arm = summary["arms"]["full"]
    assert arm["status"].startswith("stopped: early stop at step 3")
    assert arm["steps"] == 3 and arm["val_loss_best"] == 4.0 and arm["val_loss_best_step"] == 1
    assert [r["step"] for r in _rows(tmp_path / "out", "full")] == [1, 2, 3]
    # p is also measured with the best-point weights, on the same prompts and seeds.
    assert arm["p_best"]["n"] == arm["p_after"]["n"] == 1
    assert "moment=best(step 1)" in (tmp_path / "out" / "samples.txt").read_text()
    best = load_file(str(tmp_path / "out" / "arms" / "full" / "best.safetensors"))
    last = load_file(str(tmp_path / "out" / "arms" / "full" / "trained.safetensors"))
    assert best.keys() == last.keys()
    assert any(not torch.equal(best[k], last[k]) for k in best)


def test_repeats_resume_skips_finished_repeats_and_finishes_the_rest(corpus: Path,
                                                                    tmp_path: Path) -> None:
    cfg = _cfg(corpus, "training.max_steps=4", "training.eval_steps=2", "training.save_steps=2",
               "repeats=2", "arms=[{kind: full}, {kind: plan, select: 'layers=3: roles=q'}]")
    out = tmp_path / "out"
    first = run(cfg, out)
    assert (out / "config.yaml").exists()  # what `pfreeze run --resume out` reads
    # Pretend repeat 1 was killed after its step-2 checkpoint: its summary is not there yet.
    (out / "repeat-1" / "summary.json").unlink()
    done0 = (out / "repeat-0" / "summary.json").stat().st_mtime_ns
    again = run(load_config(out / "config.yaml"), out, resume=True)
    assert (out / "repeat-0" / "summary.json").stat().st_mtime_ns == done0  # not rerun
    for arm in ("full", "plan"):
        assert (again["arms"][arm]["figures"]["last_loss"]["values"]
                == first["arms"][arm]["figures"]["last_loss"]["values"])


@pytest.mark.parametrize(("arms", "needle"), [
    ("[{kind: unfreeze, start_layers: 5}]", "start_layers=5 but the model has 4 blocks"),
    ("[{kind: schedule, phases: [{start: 50, select: 'layers=3:'}]}]",
     "no phase that starts before max_steps=10"),
    ("[{kind: schedule, phases: [{start: 0, select: 'layers=3:'}, {start: 50, select: "
     "'layers=2:'}]}]", "phase start 50 is not before max_steps=10"),
])
def test_impossible_schedules_are_refused(corpus: Path, tmp_path: Path, arms: str,
                                          needle: str) -> None:
    from pfreeze.errors import PfreezeError

    with pytest.raises(PfreezeError, match=re.escape(needle)):
        run(_cfg(corpus, "training.max_steps=10", f"arms={arms}"), tmp_path / "out")


def test_grad_scores_match_a_hand_computation_and_leave_the_model_untouched() -> None:
    from pfreeze.plan.rank import grad_scores

    lm = load_model("random:gpt2")
    model = lm.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 256, (2, 16), generator=gen) for _ in range(2)]
    scores = grad_scores(model, lm.family, batches, roles={"k", "o"})
    # By hand: k of block 1 is columns 64:128 of c_attn.weight (Conv1D: (in, 3*out)).
    norms = []
    for x in batches:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(True)
        model(input_ids=x, labels=x).loss.backward()
        g = dict(model.named_parameters())["transformer.h.1.attn.c_attn.weight"].grad
        norms.append(float(torch.linalg.vector_norm(g[:, 64:128])))
    k1 = next(m for m in scores if m.role == "k" and m.layer == 1)
    assert k1.score == pytest.approx(sum(norms) / 2, rel=1e-5)
    assert {m.role for m in scores} == {"k", "o"} and len(scores) == 8
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_grad_arm_trains_the_top_matrices(corpus: Path, tmp_path: Path) -> None:
    cfg = _cfg(corpus, "training.max_steps=2", "training.eval_steps=2",
               "arms=[{kind: full}, {kind: grad, top_percent: 25, roles: 'q,v', batches: 2}]")
    summary = run(cfg, tmp_path / "out")
    arm = summary["arms"]["grad"]
    # 25% of 4 blocks = one q (64x64) and one v (32x64) matrix of random:llama.
    assert arm["trainable_params"] == 64 * 64 + 32 * 64
    assert arm["integrity"]["ok"] and arm["theta0_hash"] == summary["theta0_hash"]
    # Calibration draws its own batches: the full arm's stream is the one without the grad arm.
    rows = _rows(tmp_path / "out", "full")
    alone = run(_cfg(corpus, "training.max_steps=2", "training.eval_steps=2",
                     "arms=[{kind: full}]"), tmp_path / "alone")
    assert [r["batch_hash"] for r in rows] == [r["batch_hash"] for r in
                                                _rows(tmp_path / "alone", "full")]
    assert alone["arms"]["full"]["last_loss"] == summary["arms"]["full"]["last_loss"]
