"""The training loop and its outputs, checked against hand computations.

Most tests read one tiny finished run (conftest.tiny_run: random:gpt2, arms full and plan,
5 steps); the ‖ΔW‖ test drives the Loop step by step and snapshots the weights itself.
"""

from __future__ import annotations

import hashlib
import math
import re
import statistics
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN_STEPS, TinyRun, read_rows, rows_of
from safetensors.torch import load_file

from pfreeze.config import dump_config
from pfreeze.data.corpus import BatchStream
from pfreeze.data.formats import read_documents
from pfreeze.data.tokens import tokenize_documents
from pfreeze.measure.generation import generate_samples, p_stats
from pfreeze.measure.heldout import fixed_windows
from pfreeze.measure.stats import mean_ci, t_quantile
from pfreeze.models.load import ByteTokenizer, count_params, load_model, state_hash
from pfreeze.outputs.files import RunFiles
from pfreeze.run.loop import Loop
from pfreeze.settings import GenerationConfig

ARMS = ("full", "plan")
N_LAYERS, E = 4, 64  # random:gpt2
UPPER = (2, 3)  # the default plan arm trains q, k, v of the upper half of the blocks
CPU = torch.device("cpu")


def c_attn(layer: int, what: str = "weight") -> str:
    return f"transformer.h.{layer}.attn.c_attn.{what}"


def tracked_pieces(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The matrices behind the metrics keys, cut by hand: GPT-2's Conv1D c_attn weight is
    (in, 3E) with q | k | v as column blocks; the output projection c_proj is whole."""
    out = {}
    for layer in range(N_LAYERS):
        w = params[c_attn(layer)]
        assert w.shape == (E, 3 * E)
        for i, role in enumerate("qkv"):
            out[f"L{layer}.{role}"] = w[:, i * E:(i + 1) * E]
        out[f"L{layer}.o"] = params[f"transformer.h.{layer}.attn.c_proj.weight"]
    return out


def frob(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((a - b).double()))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------- ‖ΔW‖


def test_dw_and_dw0_equal_hand_computed_frobenius_norms(make_config, tmp_path: Path) -> None:
    steps = 3
    cfg = make_config(f"training.max_steps={steps}", "training.logging_steps=1")
    files = RunFiles(tmp_path / "run")
    files.start(dump_config(cfg))
    loop = Loop(cfg, files)
    loop.setup()
    assert [a.strategy.name for a in loop.arms] == list(ARMS)
    snaps = {a.strategy.name: [snapshot(a.model)] for a in loop.arms}
    # Both arms really start from the same weights.
    for name, w in snaps["full"][0].items():
        assert torch.equal(w, snaps["plan"][0][name]), name

    loop.batch_hashes = []  # run() keeps these for flush(); we drive the steps ourselves
    for step in range(steps):
        batch = loop.stream.next()
        loop.batch_hashes.append(hashlib.sha1(batch.numpy().tobytes()).hexdigest()[:16])
        for arm in loop.arms:
            loop.train_step(arm, step, batch)
            snaps[arm.strategy.name].append(snapshot(arm.model))
        loop.flush()

    rows = rows_of(read_rows(files.root), "train")
    assert len(rows) == steps * len(ARMS)
    expected_keys = {f"L{layer}.{role}" for layer in range(N_LAYERS) for role in "qkvo"}
    for row in rows:
        name, t = row["arm"], row["step"]
        assert set(row["dw"]) == expected_keys
        assert set(row["dw0"]) == expected_keys
        w0 = tracked_pieces(snaps[name][0])
        prev = tracked_pieces(snaps[name][t - 1])
        cur = tracked_pieces(snaps[name][t])
        for key in sorted(expected_keys):
            assert row["dw"][key] == pytest.approx(frob(cur[key], prev[key]), rel=1e-4, abs=1e-9), (
                f"{name} step {t} dw[{key}]")
            assert row["dw0"][key] == pytest.approx(frob(cur[key], w0[key]), rel=1e-4, abs=1e-9), (
                f"{name} step {t} dw0[{key}]")

    # The comparison above is not vacuous: the weights moved, and only where they may.
    last = {r["arm"]: r for r in rows if r["step"] == steps}
    assert all(v > 0 for v in last["full"]["dw"].values())
    for key, v in last["plan"]["dw0"].items():
        layer, role = int(key[1:key.index(".")]), key.split(".")[1]
        if layer in UPPER and role in "qkv":
            assert v > 0, key
        else:
            assert v == 0.0, key  # frozen: bit-identical to θ₀
    # dw0 accumulates: after step 3 it differs from the last single step.
    assert last["full"]["dw0"]["L0.q"] != pytest.approx(last["full"]["dw"]["L0.q"])


# --------------------------------------------------------------------------- batches


def test_arms_saw_identical_batches_and_batches_change(tiny_run: TinyRun) -> None:
    train = rows_of(tiny_run.rows, "train")
    by_step: dict[int, dict[str, str]] = {}
    for r in train:
        by_step.setdefault(r["step"], {})[r["arm"]] = r["batch_hash"]
    assert sorted(by_step) == list(range(1, TINY_RUN_STEPS + 1))
    for step, hashes in by_step.items():
        assert set(hashes) == set(ARMS), step
        assert hashes["full"] == hashes["plan"], f"arms saw different batches at step {step}"
    per_step = [by_step[s]["full"] for s in sorted(by_step)]
    assert len(set(per_step)) == len(per_step), "a batch repeated between steps"


def _train_ids(cfg) -> list[int]:
    stats = tokenize_documents(read_documents(cfg.data), ByteTokenizer(), cfg.data,
                               min_tokens=cfg.data.block_size)
    return stats.train_ids


def _hashes(stream: BatchStream, n: int) -> list[str]:
    return [hashlib.sha1(stream.next().numpy().tobytes()).hexdigest()[:16] for _ in range(n)]


def test_batch_stream_is_reproducible_from_the_seed(tiny_run: TinyRun) -> None:
    cfg = tiny_run.cfg
    ids = _train_ids(cfg)
    batch = cfg.training.per_device_train_batch_size * cfg.training.gradient_accumulation_steps
    block = cfg.data.block_size

    # Rebuilt from the corpus and the seed alone, the stream gives the run's batches.
    logged = [r["batch_hash"] for r in rows_of(tiny_run.rows, "train", "full")]
    assert _hashes(BatchStream(ids, block, batch, cfg.training.seed), TINY_RUN_STEPS) == logged
    # Another seed gives other batches.
    other = _hashes(BatchStream(ids, block, batch, cfg.training.seed + 1), TINY_RUN_STEPS)
    assert set(other).isdisjoint(logged)

    # Every row of a batch is one contiguous window of the training tokens (never validation).
    train_bytes = bytes(ids)
    for x in [BatchStream(ids, block, batch, 7).next() for _ in range(3)]:
        assert x.shape == (batch, block)
        for row in x.tolist():
            assert bytes(row) in train_bytes


def test_batch_stream_rejects_text_shorter_than_a_window() -> None:
    from pfreeze.errors import PfreezeError

    with pytest.raises(PfreezeError, match="fewer than one window"):
        BatchStream(list(range(10)), 32, 2, 0)


# --------------------------------------------------------------------------- θ₀


def test_every_arm_starts_from_the_same_theta0(tiny_run: TinyRun) -> None:
    s = tiny_run.summary
    assert re.fullmatch(r"[0-9a-f]{64}", s["theta0_hash"])
    for name in ARMS:
        assert s["arms"][name]["theta0_hash"] == s["theta0_hash"], name
    # The hash is that of the seeded random init, recomputed independently.
    fresh = load_model("random:gpt2", seed=tiny_run.cfg.training.seed).model
    assert state_hash(fresh) == s["theta0_hash"]


def test_theta0_depends_on_the_seed_of_a_random_model(make_config, tiny_run: TinyRun,
                                                      tmp_path: Path) -> None:
    def theta0(seed: int) -> str:
        loop = Loop(make_config(f"training.seed={seed}"), RunFiles(tmp_path / str(seed)))
        loop.setup()
        assert {a.theta0_hash for a in loop.arms} == {loop.theta0_hash}
        return loop.theta0_hash

    assert theta0(tiny_run.cfg.training.seed) == tiny_run.summary["theta0_hash"]
    assert theta0(tiny_run.cfg.training.seed + 1) != tiny_run.summary["theta0_hash"]


# --------------------------------------------------------------------------- p and CI


def test_sample_p_equals_hand_count_of_top_set_ids() -> None:
    lm = load_model("random:gpt2", seed=0)
    gcfg = GenerationConfig(prompts=["Call me", "The whale"], samples_per_prompt=3,
                            max_new_tokens=12, seed=7, top_k=None)
    top = frozenset(range(ord("a"), ord("z") + 1)) | {ord(" ")}
    samples = generate_samples(lm.model, lm.tokenizer, gcfg, top, CPU, False)
    assert len(samples) == 6
    hits_total = 0
    for s in samples:
        assert len(s.ids) == 12, "every sample has exactly max_new_tokens new tokens"
        hits = 0
        for token in s.ids:
            if token in top:
                hits += 1
        assert s.p == hits / 12
        assert s.text == lm.tokenizer.decode(s.ids)
        hits_total += hits
    assert 0 < hits_total < 6 * 12, "pick a top set that makes the count informative"
    # p_stats is mean_ci of exactly these shares.
    ps = [s.p for s in samples]
    stats = p_stats(samples)
    assert stats["values"] == ps and stats["n"] == 6
    assert stats["mean"] == pytest.approx(sum(ps) / 6)
    # Seeded: the same model gives the same samples again.
    again = generate_samples(lm.model, lm.tokenizer, gcfg, top, CPU, False)
    assert [s.ids for s in again] == [s.ids for s in samples]


def test_sampling_leaves_the_global_random_state_alone() -> None:
    lm = load_model("random:gpt2", seed=0)
    gcfg = GenerationConfig(prompts=["Call me"], samples_per_prompt=1, max_new_tokens=3)
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    generate_samples(lm.model, lm.tokenizer, gcfg, frozenset({32}), CPU, False)
    assert torch.equal(torch.rand(4), expected)


def test_mean_ci_equals_hand_computation() -> None:
    values = [0.2, 0.4, 0.4, 0.5, 0.9]
    mean = 2.4 / 5  # 0.48
    var = (0.28**2 + 0.08**2 + 0.08**2 + 0.02**2 + 0.42**2) / 4  # sample variance: 0.067
    std = math.sqrt(var)
    half = 2.776 * std / math.sqrt(5)  # t(0.975, df=4) = 2.776
    got = mean_ci(values)
    assert got["n"] == 5 and got["values"] == values
    assert got["mean"] == pytest.approx(0.48)
    assert got["std"] == pytest.approx(std) == pytest.approx(0.2588435821)
    lo, hi = got["ci95"]
    assert lo == pytest.approx(mean - half) and hi == pytest.approx(mean + half)
    assert hi - lo == pytest.approx(2 * 0.3213469, rel=1e-5)
    assert t_quantile(4) == 2.776


def test_mean_ci_small_samples() -> None:
    one = mean_ci([0.3])
    assert one["mean"] == 0.3 and one["std"] == 0.0 and one["ci95"] == [None, None]
    two = mean_ci([0.0, 1.0])  # std = sqrt(0.5), t(df=1) = 12.706
    assert two["ci95"][1] - 0.5 == pytest.approx(12.706 * math.sqrt(0.5) / math.sqrt(2))


def test_fixed_windows_spread_evenly_and_never_drop_windows() -> None:
    ids = list(range(100))  # 10 windows of 10 fit
    assert fixed_windows(ids, 10, 4)[:, 0].tolist() == [0, 30, 60, 90]
    assert fixed_windows(ids, 10, 1)[:, 0].tolist() == [0]
    assert fixed_windows(ids, 10, 10)[:, 0].tolist() == list(range(0, 100, 10))
    # Asking for more windows than fit gives every window once.
    assert fixed_windows(ids, 10, 20)[:, 0].tolist() == list(range(0, 100, 10))
    assert fixed_windows(list(range(30)), 10, 4)[:, 0].tolist() == [0, 10, 20]
    for count in range(1, 12):
        starts = fixed_windows(ids, 10, count)[:, 0].tolist()
        assert len(starts) == min(count, 10) and starts == sorted(set(starts)), count
    w = fixed_windows(ids, 10, 3)
    assert torch.equal(w, torch.stack([torch.arange(s, s + 10) for s in (0, 50, 90)]))
    assert fixed_windows(list(range(5)), 10, 3).shape == (0, 10)


# --------------------------------------------------------------------------- summary


def _hand_count_plan_params() -> int:
    model = load_model("random:gpt2").model
    params = dict(model.named_parameters())
    return sum(params[c_attn(layer, what)].numel() for layer in UPPER
               for what in ("weight", "bias"))


def test_summary_trainable_params_equal_hand_counts(tiny_run: TinyRun) -> None:
    arms = tiny_run.summary["arms"]
    assert arms["plan"]["trainable_params"] == 2 * (E * 3 * E + 3 * E) == 24_960
    assert arms["plan"]["trainable_params"] == _hand_count_plan_params()
    total = count_params(load_model("random:gpt2").model)
    assert arms["full"]["trainable_params"] == total
    for name in ARMS:
        assert arms[name]["total_params"] == total
    assert tiny_run.summary["model"]["total_params"] == total
    assert tiny_run.summary["model"]["n_layers"] == N_LAYERS


def test_summary_losses_match_metrics(tiny_run: TinyRun) -> None:
    for name in ARMS:
        a = tiny_run.summary["arms"][name]
        evals = rows_of(tiny_run.rows, "eval", name)
        train = rows_of(tiny_run.rows, "train", name)
        val = {r["step"]: r["val_loss"] for r in evals}
        assert a["val_loss_best_step"] in val
        assert a["val_loss_best"] == min(val.values())
        assert val[a["val_loss_best_step"]] == a["val_loss_best"]
        assert a["val_loss_before"] == val[0]
        assert a["val_loss_after"] == val[TINY_RUN_STEPS]
        assert a["steps"] == TINY_RUN_STEPS
        assert a["last_loss"] == train[-1]["loss"]
        assert a["mean_loss"] == pytest.approx(statistics.fmean(r["loss"] for r in train))
    full, plan = (tiny_run.summary["arms"][n] for n in ARMS)
    # Same θ₀, same windows, same prompts and seeds: identical "before" measurements.
    assert full["val_loss_before"] == plan["val_loss_before"]
    assert full["p_before"] == plan["p_before"]
    # Training moved the full arm's held-out loss.
    assert full["val_loss_after"] != full["val_loss_before"]


def test_summary_integrity(tiny_run: TinyRun) -> None:
    plan = tiny_run.summary["arms"]["plan"]["integrity"]
    a = tiny_run.summary["arms"]["plan"]
    assert plan["ok"] is True and plan["violations"] == []
    assert plan["checked_elements"] == a["total_params"] - a["trainable_params"]
    n_tensors = len(list(tiny_run.loop.arms[1].model.parameters()))
    assert plan["frozen_tensors"] == n_tensors - 2 * len(UPPER)  # c_attn weight+bias of 2, 3
    full = tiny_run.summary["arms"]["full"]["integrity"]
    assert full["ok"] is True and full["checked_elements"] == 0


# --------------------------------------------------------------------------- files


def test_metrics_rows_per_step_and_arm_and_eval_steps(tiny_run: TinyRun) -> None:
    train = rows_of(tiny_run.rows, "train")
    pairs = [(r["step"], r["arm"]) for r in train]
    assert sorted(pairs) == [(s, a) for s in range(1, TINY_RUN_STEPS + 1) for a in ARMS]
    for r in train:
        assert math.isfinite(r["loss"]) and r["step_time_s"] > 0
    # eval_steps=2, 5 steps: at 0, the multiples 2 and 4, and the end (5).
    for name in ARMS:
        assert [r["step"] for r in rows_of(tiny_run.rows, "eval", name)] == [0, 2, 4, 5]
    assert {r["kind"] for r in tiny_run.rows} == {"train", "eval"}
    assert (tiny_run.dir / "summary.json").is_file()
    assert (tiny_run.dir / "config.yaml").is_file()


def test_logged_lr_is_the_lr_each_step_used(tiny_run: TinyRun) -> None:
    lr, n = tiny_run.cfg.training.learning_rate, TINY_RUN_STEPS  # linear decay, no warm-up
    for name in ARMS:
        logged = [r["lr"] for r in rows_of(tiny_run.rows, "train", name)]
        assert logged == pytest.approx([lr * (1 - k / n) for k in range(n)])


def test_samples_file_lists_every_sample_with_its_p(tiny_run: TinyRun) -> None:
    text = (tiny_run.dir / "samples.txt").read_text(encoding="utf-8")
    heads = re.findall(r"^=== arm=(\S+) moment=(\S+) prompt=('.*?') seed=(\d+) sample=(\d+) "
                       r"p=([0-9.]+)$", text, flags=re.MULTILINE)
    g = tiny_run.cfg.generation
    assert len(heads) == len(ARMS) * 2 * len(g.prompts) * g.samples_per_prompt
    for name in ARMS:
        for moment in ("before", "after"):
            ps = [float(h[5]) for h in heads if h[0] == name and h[1] == moment]
            values = tiny_run.summary["arms"][name][f"p_{moment}"]["values"]
            assert ps == [round(v, 3) for v in values], (name, moment)


def test_trained_safetensors_hold_exactly_the_trained_tensors(tiny_run: TinyRun) -> None:
    models = {a.strategy.name: a.model for a in tiny_run.loop.arms}
    theta0 = dict(load_model("random:gpt2", seed=tiny_run.cfg.training.seed)
                  .model.named_parameters())

    plan = load_file(str(tiny_run.dir / "arms" / "plan" / "trained.safetensors"))
    assert set(plan) == {c_attn(layer, what) for layer in UPPER for what in ("weight", "bias")}
    final = dict(models["plan"].named_parameters())
    for name, t in plan.items():
        assert torch.equal(t, final[name].detach()), name  # the trained values...
        assert not torch.equal(t, theta0[name].detach()), name  # ...which moved
    for name, p in final.items():  # and everything else in the plan arm is still θ₀
        if name not in plan:
            assert torch.equal(p.detach(), theta0[name].detach()), name
    # dw0 of the last step is the drift of the saved tensor from θ₀.
    last = [r for r in rows_of(tiny_run.rows, "train", "plan") if r["step"] == TINY_RUN_STEPS][0]
    assert last["dw0"]["L3.k"] == pytest.approx(
        frob(plan[c_attn(3)][:, E:2 * E], theta0[c_attn(3)].detach()[:, E:2 * E]), rel=1e-4)

    full = load_file(str(tiny_run.dir / "arms" / "full" / "trained.safetensors"))
    final = dict(models["full"].named_parameters())
    assert set(full) == set(final)
    for name, t in full.items():
        assert torch.equal(t, final[name].detach()), name


@pytest.mark.parametrize("name", ["random:llama", "random:gpt2", "random:gpt-neox"])
def test_batched_prompts_sample_as_if_alone(name: str, lively) -> None:
    """Prompts of other lengths in the batch (left padding) do not change a prompt's output."""
    lm = lively(name)
    greedy = {"samples_per_prompt": 1, "max_new_tokens": 10, "top_k": 1}
    alone = generate_samples(lm.model, lm.tokenizer,
                             GenerationConfig(prompts=["Call me"], **greedy), {32}, CPU, False)
    mixed = generate_samples(lm.model, lm.tokenizer,
                             GenerationConfig(prompts=["The whale was white", "Call me"],
                                              **greedy), {32}, CPU, False)
    assert mixed[1].prompt == "Call me" and mixed[1].ids == alone[0].ids
    assert len(set(alone[0].ids)) > 3  # the continuation depends on its context


def test_static_cache_samples_what_the_dynamic_cache_samples() -> None:
    lm = load_model("random:llama", seed=0)
    gcfg = GenerationConfig(prompts=["Call me", "It was a"], samples_per_prompt=2,
                            max_new_tokens=8)
    dynamic = generate_samples(lm.model, lm.tokenizer, gcfg, {32}, CPU, False,
                               static_cache=False)
    static = generate_samples(lm.model, lm.tokenizer, gcfg, {32}, CPU, False, static_cache=True)
    assert [s.ids for s in static] == [s.ids for s in dynamic]


def test_the_bf16_twin_is_reused_and_refilled_with_the_current_weights() -> None:
    from pfreeze.measure.generation import _bf16_twin, release_twin

    try:  # the twin is process-global: never leave it to the next test
        a, b = load_model("random:llama", seed=0).model, load_model("random:llama", seed=1).model
        twin = _bf16_twin(a)
        assert all(p.dtype == torch.bfloat16 for p in twin.parameters())
        assert all(t.dtype == u.dtype for t, u in zip(twin.buffers(), a.buffers(), strict=True))
        assert _bf16_twin(b) is twin  # same model kind: one instance, one compiled decode step
        for t, p in zip(twin.parameters(), b.parameters(), strict=True):
            assert torch.equal(t, p.to(torch.bfloat16))
        c = load_model("random:llama", seed=1).model
        c.config.rms_norm_eps = 1e-2  # same shapes, another computation: a new copy
        assert _bf16_twin(c) is not twin
        assert _bf16_twin(load_model("random:gpt2", seed=0).model) is not twin
    finally:
        release_twin()
