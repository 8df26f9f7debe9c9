"""The memory plan (pfreeze.plan.memory): byte counts against a hand computation, and a run
that cannot fit stops before it loads anything, with one line naming the knobs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from pfreeze.config import RunConfig
from pfreeze.errors import PfreezeError
from pfreeze.models.load import meta_model, model_config
from pfreeze.outputs.files import RunFiles
from pfreeze.plan import memory
from pfreeze.run.arm_run import StepRecord
from pfreeze.run.fit import memory_plan
from pfreeze.run.loop import Loop

QKV = "arms=[{kind: plan, name: qkv, select: 'layers=2: roles=q,k,v'}, {kind: full}]"
CPU = torch.device("cpu")

# random:llama by hand: hidden 64, 4 heads of 16, 2 kv heads, MLP 128, 4 blocks, vocab 257.
H, MLP, V, TOKENS = 64, 128, 257, 2 * 32  # per_device_train_batch_size 2 × block_size 32
Q, K_OR_V = H * H, 2 * 16 * H  # q_proj 64×64; k_proj, v_proj 32×64
BLOCK = 4 * (Q + 2 * K_OR_V + H * H + 3 * H * MLP + 2 * H)  # attention, MLP, two norms
TOTAL = V * H + BLOCK + H  # tied embedding, blocks, final norm
QKV_UPPER = 2 * (Q + 2 * K_OR_V)  # blocks 2 and 3


def _buffers() -> int:
    model = meta_model(model_config("random:llama")[0])
    return sum(b.numel() * b.element_size() for b in model.buffers())


@pytest.mark.parametrize(("dtype", "master", "optim", "slots"), [
    ("bfloat16", "fp32", "adamw", 2), ("bfloat16", "storage", "adamw", 2),
    ("float32", "fp32", "sgd", 1)])
def test_byte_counts_match_a_hand_computation(make_config: Callable[..., RunConfig],
                                              dtype: str, master: str, optim: str,
                                              slots: int) -> None:
    cfg = make_config("model.name=random:llama", QKV, f"model.dtype={dtype}",
                      f"training.master_weights={master}", f"training.optim={optim}")
    plan = memory_plan(cfg, CPU, bf16=False)
    qkv, full = plan.arms
    store = 2 if dtype == "bfloat16" else 4
    keep = 4 if master == "fp32" else store
    assert TOTAL == 164_480 and QKV_UPPER == 16_384
    assert qkv.weights == (TOTAL - QKV_UPPER) * store + QKV_UPPER * keep + _buffers()
    assert qkv.grads == QKV_UPPER * keep
    assert qkv.optimizer == slots * QKV_UPPER * keep
    assert full.weights == TOTAL * keep + _buffers()
    assert full.optimizer == slots * TOTAL * keep
    # Activations: blocks 2-3 for qkv, all 4 for full; bf16 autocast where stored in bf16.
    b = 2 if dtype == "bfloat16" else 4
    per_block, logits = TOKENS * (10 * H + 3 * MLP) * b, TOKENS * V * (b + 8)
    assert qkv.activations == 2 * per_block + logits
    assert full.activations == 4 * per_block + logits
    assert plan.base == TOTAL * store  # θ₀ beside the arms on the CPU
    assert plan.together == (plan.base + qkv.weights + qkv.optimizer + full.weights
                             + full.optimizer + full.grads + full.activations)


def test_frozen_tensors_count_once_for_arms_together(
        make_config: Callable[..., RunConfig]) -> None:
    two = ("arms=[{kind: plan, name: up, select: 'layers=2: roles=q,k,v'}, "
           "{kind: plan, name: low, select: 'layers=:2 roles=q,k,v'}]")
    cfg = make_config("model.name=random:llama", two, "model.dtype=bfloat16")
    plan = memory_plan(cfg, torch.device("meta"), bf16=False)
    up, low = plan.arms
    # Each arm trains q, k, v of two blocks (QKV_UPPER elements, fp32 masters) and leaves the
    # rest frozen; no tensor trains in both, so every θ₀ tensor is frozen in some arm.
    assert sum(up.frozen.values()) == sum(low.frozen.values()) == (TOTAL - QKV_UPPER) * 2
    assert plan.shared == TOTAL * 2
    own = QKV_UPPER * 4 + _buffers() + 2 * QKV_UPPER * 4  # masters, buffers, AdamW
    assert up.own == low.own == own
    assert plan.together == TOTAL * 2 + 2 * own + max(up.step, low.step)
    assert plan.together < up.resident + low.resident + max(up.step, low.step)


def test_a_lora_arm_keeps_activations_from_its_lowest_adapted_block(
        make_config: Callable[..., RunConfig]) -> None:
    lora = "arms=[{kind: lora, name: lora, select: 'layers=2: roles=q,v'}]"
    arm = memory_plan(make_config("model.name=random:llama", lora), CPU, bf16=False).arms[0]
    # Blocks 2 and 3 keep activations; its base is all frozen θ₀, shareable.
    assert arm.activations == 2 * TOKENS * (10 * H + 3 * MLP) * 4 + TOKENS * V * 12
    assert sum(arm.frozen.values()) == TOTAL * 4 and arm.grads == arm.optimizer == 0


def test_an_arm_choosing_from_the_weights_counts_as_training_everything(
        make_config: Callable[..., RunConfig]) -> None:
    snr = "arms=[{kind: snr, name: snr, top_percent: 25}]"
    arm = memory_plan(make_config("model.name=random:llama", snr), CPU, bf16=False).arms[0]
    # SNR reads the weights to choose: on the meta device its plan is the upper bound.
    assert arm.grads == TOTAL * 4 and arm.optimizer == 2 * TOTAL * 4 and not arm.frozen
    assert "upper bound" in arm.note


def test_checkpointing_keeps_block_inputs_only(make_config: Callable[..., RunConfig]) -> None:
    cfg = make_config("model.name=random:llama", QKV, "training.gradient_checkpointing=true")
    qkv = memory_plan(cfg, CPU, bf16=False).arms[0]
    per_block = TOKENS * (10 * H + 3 * MLP) * 4
    assert qkv.activations == 2 * TOKENS * H * 4 + per_block + TOKENS * V * 12


def test_a_run_that_cannot_fit_stops_before_loading(
        make_config: Callable[..., RunConfig], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_config("model.name=random:llama", QKV)
    # arms_placement=auto: not even the largest arm alone fits.
    need = memory_plan(cfg, CPU, bf16=False).alone
    monkeypatch.setattr(memory, "free_bytes", lambda device: need - 1)  # a small device

    def loaded(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("pfreeze.run.loop.load_model", loaded)
    monkeypatch.setattr("pfreeze.run.loop.read_documents", loaded)
    with pytest.raises(PfreezeError) as info:
        Loop(cfg, RunFiles(tmp_path / "run")).setup()
    line = str(info.value)
    assert "\n" not in line and "MiB free" in line
    for knob in ("per_device_train_batch_size", "gradient_checkpointing", "model.dtype"):
        assert knob in info.value.fix
    monkeypatch.setattr(memory, "free_bytes", lambda device: need)  # just fits: goes on
    with pytest.raises(AssertionError, match="loaded"):
        Loop(cfg, RunFiles(tmp_path / "run")).setup()


def test_peak_memory_is_the_runs_not_the_last_steps(tiny_run: Any) -> None:
    arm = dataclasses.replace(tiny_run.loop.arms[0], peak_mem_mb=None, peak_reserved_mb=None)
    for mem, reserved in ((30.0, 100.0), (50.0, 80.0), (20.0, None)):
        arm.note_memory(StepRecord(1, torch.zeros(()), torch.zeros(0), torch.zeros(0), 0.0,
                                   0.0, mem, 1e-3, reserved))
    assert (arm.peak_mem_mb, arm.peak_reserved_mb) == (50.0, 100.0)
    figures = arm.summary(64, False, None, None, None, None)
    assert (figures["peak_mem_mb"], figures["peak_reserved_mb"]) == (50.0, 100.0)
    summary = tiny_run.summary
    assert all("peak_reserved_mb" in a for a in summary["arms"].values())
    assert summary["memory_plan"]["arms"][0]["total_mib"] > 0


def test_auto_dtype_is_the_checkpoints_own(make_config: Callable[..., RunConfig],
                                           tmp_path: Path) -> None:
    config, own = model_config("random:llama")
    assert not own and memory.Shape.of(config).layers == 4
    config.dtype = "bfloat16"  # what a checkpoint saved in bf16 says
    config.save_pretrained(tmp_path / "ckpt")
    cfg = make_config(f"model.name={tmp_path / 'ckpt'}", "arms=[{kind: plan, select: 'layers=3'}]")
    arm = memory_plan(cfg, CPU, bf16=False).arms[0]
    trained = BLOCK // 4
    assert arm.weights == (TOTAL - trained) * 2 + trained * 4 + _buffers()
    cfg = make_config(f"model.name={tmp_path / 'ckpt'}", "model.dtype=float32",
                      "arms=[{kind: plan, select: 'layers=3'}]")
    assert memory_plan(cfg, CPU, bf16=False).arms[0].weights == TOTAL * 4 + _buffers()


def test_an_arm_too_large_says_by_how_much_and_over_how_many_devices() -> None:
    from pfreeze.plan.memory import ArmMemory, MemoryPlan

    gib = 2**30
    big = ArmMemory("full", weights=30 * gib, grads=30 * gib, optimizer=60 * gib,
                    activations=20 * gib)
    small = ArmMemory("qkv", weights=15 * gib, grads=1 * gib, optimizer=2 * gib,
                      activations=10 * gib)
    plan = MemoryPlan([big, small], base=0, free=80 * gib, device="cuda:0")
    # 140 GiB against 80 free: 60 GiB over; 120 GiB of state over (80 - 20) GiB per device = 2.
    assert plan.misses() == ["arm 'full' needs 143,360 MiB: 61,440 MiB more than cuda:0 has "
                             "free; sharded (FSDP) over 2 or more such devices it fits"]
    huge = ArmMemory("huge", weights=gib, grads=gib, optimizer=gib, activations=90 * gib)
    assert "activations alone exceed" in MemoryPlan([huge], 0, 80 * gib, "cuda:0").misses()[0]
    assert MemoryPlan([big], 0, None, "cuda:0").misses() == []
