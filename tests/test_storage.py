"""Storage dtype per tensor (model.dtype, training.master_weights): frozen tensors stay in
their storage dtype and bit-identical to θ₀; trained ones get fp32 masters (or train in the
storage dtype); a bf16-stored run agrees with an fp32 one to bf16 tolerance."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pfreeze.config import RunConfig
from pfreeze.errors import PfreezeError
from pfreeze.models.load import load_model, state_hash
from pfreeze.outputs.files import RunFiles
from pfreeze.run.loop import Loop
from pfreeze.run.session import run_loop

ARMS = ("arms=[{kind: plan, name: qkv, select: 'layers=2: roles=q,k,v'}, "
        "{kind: plan, name: part, select: 'roles=k heads=1'}]")
BF16 = ("model.name=random:llama", "model.dtype=bfloat16", "training.bf16=auto",
        "training.weight_decay=0.1", "training.learning_rate=1e-2", ARMS)


def _run(make_config: Callable[..., RunConfig], out: Path, *extra: str) -> Loop:
    loop = Loop(make_config(*extra), RunFiles(out))
    run_loop(loop)
    return loop


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8)


def test_bf16_frozen_tensors_stay_bf16_and_bit_identical(
        make_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    loop = _run(make_config, tmp_path / "run", *BF16)
    theta0 = dict(load_model("random:llama", seed=0, dtype="bfloat16").model.named_parameters())
    assert loop.theta0_hash == state_hash(load_model("random:llama", dtype="bfloat16").model)
    for arm in loop.arms:
        trained = arm.strategy.trained_names()
        assert arm.freezer.audit()["ok"]
        for name, p in arm.model.named_parameters():
            if name not in trained:  # frozen: no fp32 copy, the very bits of θ₀
                assert p.dtype == torch.bfloat16, name
                assert torch.equal(_bits(p), _bits(theta0[name])), name
                continue
            assert p.dtype == torch.float32, name  # fp32 master weights
            assert not torch.equal(p, theta0[name].float()), f"{name} did not train"
            part = arm.freezer.partial.get(name)
            if part is not None:  # its frozen elements: θ₀'s bf16 bits, decay and all
                kept = p.detach()[part.frozen].to(torch.bfloat16)
                assert torch.equal(_bits(kept), _bits(theta0[name][part.frozen.cpu()]))
    assert {a.strategy.name for a in loop.arms if a.freezer.partial} == {"part"}


def test_master_weights_storage_trains_in_bf16(make_config: Callable[..., RunConfig],
                                               tmp_path: Path) -> None:
    loop = _run(make_config, tmp_path / "run", *BF16, "training.master_weights=storage",
                "training.max_steps=2")
    for arm in loop.arms:
        assert {p.dtype for p in arm.model.parameters()} == {torch.bfloat16}
        state = arm.optimizer.state_dict()["state"]
        assert state and all(s["exp_avg"].dtype == torch.bfloat16 for s in state.values())


def test_bf16_and_fp32_storage_agree_in_loss(make_config: Callable[..., RunConfig],
                                             tmp_path: Path) -> None:
    common = ("model.name=random:llama", "training.bf16=auto", "arms=[{kind: full}]")
    fp32 = _run(make_config, tmp_path / "a", *common).arms[0].losses
    bf16 = _run(make_config, tmp_path / "b", *common, "model.dtype=bfloat16").arms[0].losses
    assert len(fp32) == len(bf16) == 3
    # bf16 has 8 bits of mantissa: a relative difference of a few 1e-3 per value.
    assert bf16 == pytest.approx(fp32, rel=2e-2)
    assert bf16 != fp32  # the storage did change something


def test_bf16_storage_refuses_bf16_false(make_config: Callable[..., RunConfig],
                                         tmp_path: Path) -> None:
    cfg = make_config("model.name=random:llama", "model.dtype=bfloat16", "training.bf16=false")
    with pytest.raises(PfreezeError) as info:
        Loop(cfg, RunFiles(tmp_path / "run")).setup()
    assert "training.bf16=auto" in info.value.fix and "\n" not in str(info.value)


def test_auto_dtype_is_float32_for_random_models() -> None:
    model = load_model("random:gpt2").model
    assert {p.dtype for p in model.parameters()} == {torch.float32}
