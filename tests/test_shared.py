"""θ₀'s frozen tensors are held once for all arms (pfreeze.run.shared): an arm's tensor that it
never trains shares its storage with every other arm's copy of that θ₀ tensor, a tensor it
trains at some step is its own, and a run with sharing equals one without, bit for bit."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import read_rows, rows_of
from safetensors.torch import load_file

from pfreeze.config import RunConfig
from pfreeze.errors import PfreezeError
from pfreeze.outputs.files import RunFiles
from pfreeze.plan.masks import tensor_digest
from pfreeze.run import loop as loop_module
from pfreeze.run.arms import base as arms_base
from pfreeze.run.loop import Loop
from pfreeze.run.session import run_loop

ARMS = ("model.name=random:llama", "training.max_steps=4", "training.weight_decay=0.1",
        "model.dtype=bfloat16", "training.bf16=auto",
        "arms=[{kind: full}, {kind: plan, name: qkv, select: 'layers=2: roles=q,k,v'}, "
        "{kind: unfreeze, every: 2}, {kind: lora, name: lora, select: 'layers=2: roles=q,v'}]")


def _storage(model: torch.nn.Module) -> dict[str, int]:
    return {n: p.untyped_storage().data_ptr() for n, p in model.named_parameters()}


def _run(make_config: Callable[..., RunConfig], out: Path) -> tuple[Loop, dict]:
    loop = Loop(make_config(*ARMS), RunFiles(out))
    return loop, run_loop(loop)


def test_frozen_tensors_share_theta0_and_trained_ones_do_not(
        make_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    loop, summary = _run(make_config, tmp_path / "run")
    arms = {a.strategy.name: a for a in loop.arms}
    full, qkv = _storage(arms["full"].model), _storage(arms["qkv"].model)
    unfreeze = _storage(arms["unfreeze"].model)
    lora = {n.replace("base_model.model.", "").replace(".base_layer", ""): s
            for n, s in _storage(arms["lora"].model).items() if "lora_" not in n}
    trained = arms["qkv"].strategy.trained_names()
    assert trained and set(qkv) == set(full) == set(lora)
    for name in qkv:
        # The full arm trains everything: nothing of it is shared.
        assert full[name] not in (qkv[name], lora[name])
        if name in trained:  # the qkv arm's own fp32 master, never the LoRA arm's θ₀
            assert qkv[name] != lora[name]
            assert arms["qkv"].freezer.params[name].dtype == torch.float32
        else:  # one storage, in the checkpoint's dtype
            assert qkv[name] == lora[name]
    assert all(p.dtype == torch.bfloat16 for n, p in arms["lora"].model.named_parameters()
               if "lora_" not in n)
    # The unfreeze arm trains every block by its last phase: none of its blocks is shared.
    ever = arms["unfreeze"].strategy.trained_names()
    assert ever and all(unfreeze[n] != qkv[n] for n in ever)
    assert summary["execution"]["frozen_shared_mib"] > 0
    # The shared tensors' θ₀ digests were hashed once, on the host, and handed to each
    # Freezer: they are the digests of what the arm holds (frozen, so still θ₀).
    known = arms["qkv"].freezer.known
    assert known and not set(known) & trained and set(known) <= set(qkv)
    params = arms["qkv"].freezer.params
    assert known == {n: tensor_digest(params[n]) for n in known}
    # Training did not move a shared tensor: each arm's audit finds its frozen tensors at θ₀.
    for arm in summary["arms"].values():
        assert arm["integrity"]["ok"], arm["integrity"]


class _NoSharing:
    def __init__(self, *args: object) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    mib = 0.0

    def alias(self, *args: object, **kwargs: object) -> dict[str, str]:
        return {}


def test_sharing_changes_no_number(make_config: Callable[..., RunConfig], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _, shared = _run(make_config, tmp_path / "shared")
    monkeypatch.setattr(loop_module, "SharedTheta0", _NoSharing)
    loop, alone = _run(make_config, tmp_path / "alone")
    assert alone["execution"]["frozen_shared_mib"] == 0
    ptrs = [_storage(a.model) for a in loop.arms if a.strategy.name in ("qkv", "lora")]
    assert not set(ptrs[0].values()) & set(ptrs[1].values())
    for kind in ("train", "eval"):
        got = [{k: r[k] for k in ("step", "arm", "loss", "val_loss", "batch_hash") if k in r}
               for r in rows_of(read_rows(tmp_path / "shared"), kind)]
        want = [{k: r[k] for k in ("step", "arm", "loss", "val_loss", "batch_hash") if k in r}
                for r in rows_of(read_rows(tmp_path / "alone"), kind)]
        assert got == want and got
    for arm in ("full", "qkv", "unfreeze", "lora"):
        a = load_file(tmp_path / "shared" / "arms" / arm / "trained.safetensors")
        b = load_file(tmp_path / "alone" / "arms" / arm / "trained.safetensors")
        assert a.keys() == b.keys() and a
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_tensor_an_arm_edits_in_its_build_stays_its_own(
        make_config: Callable[..., RunConfig], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An arm kind may change a tensor it then keeps frozen: that tensor is not θ₀'s."""
    edited = "model.layers.0.self_attn.o_proj.weight"
    copy = arms_base.ArmStrategy.copy_theta0

    def zero_for_qkv(self: arms_base.ArmStrategy, base: torch.nn.Module) -> torch.nn.Module:
        model = copy(self, base)
        if self.name == "qkv":
            with torch.no_grad():
                model.get_parameter(edited).zero_()
        return model

    monkeypatch.setattr(arms_base.ArmStrategy, "copy_theta0", zero_for_qkv)
    loop = Loop(make_config(*ARMS), RunFiles(tmp_path / "run"))
    loop.setup()
    arms = {a.strategy.name: a for a in loop.arms}
    qkv, lora = _storage(arms["qkv"].model), _storage(arms["lora"].model)
    assert not arms["qkv"].model.get_parameter(edited).any()
    assert qkv[edited] != lora["base_model.model." + edited]
    name = "model.layers.1.self_attn.o_proj.weight"  # untouched: still shared
    assert qkv[name] == lora["base_model.model." + name]


def test_a_checkpoint_that_trains_a_now_frozen_tensor_is_refused(
        make_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    """A data-driven plan that comes out differently on resume must not write its old
    tensors into θ₀'s shared copy: one line, and nothing written."""
    loop = Loop(make_config(*ARMS), RunFiles(tmp_path / "run"))
    loop.setup()
    arms = {a.strategy.name: a for a in loop.arms}
    frozen = "model.layers.0.self_attn.q_proj.weight"  # qkv trains blocks 2 and 3 only
    before = arms["qkv"].model.get_parameter(frozen).detach().clone()
    t = torch.ones_like(before)
    with pytest.raises(PfreezeError, match=f"trains {frozen}, which the arm's plan now"):
        arms["qkv"].restore(2, {f"param.{frozen}": t}, {}, {})
    assert torch.equal(arms["qkv"].model.get_parameter(frozen), before)
    assert torch.equal(arms["lora"].model.get_parameter("base_model.model." + frozen), before)


def test_compiled_arms_on_shared_theta0_match_eager(
        make_config: Callable[..., RunConfig], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Compiled steps read the shared θ₀ storage as every arm's frozen input: the same losses
    as eager (to fp32 reassociation) and every frozen element still at θ₀."""
    arms = ("model.name=random:llama", "training.max_steps=3", "model.dtype=bfloat16",
            "training.bf16=auto",
            "arms=[{kind: plan, name: qkv, select: 'layers=2: roles=q,k,v'}, "
            "{kind: lora, name: lora, select: 'layers=2: roles=q,v'}]")
    runs = {}
    for compiled in (False, True):
        loop = Loop(make_config(*arms, f"training.torch_compile={str(compiled).lower()}"),
                    RunFiles(tmp_path / str(compiled)))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pfreeze.run"):
            runs[compiled] = run_loop(loop)
        assert runs[compiled]["execution"]["compiled"] is compiled
        # Each arm stepped through its compiled graph (or none), and said so once.
        assert all((a.step_fn is not None) is compiled for a in loop.arms)
        said = [r.getMessage() for r in caplog.records if "compiling" in r.getMessage()]
        assert said == (["compiling arm qkv's step", "compiling arm lora's step"]
                        if compiled else [])
        assert runs[compiled]["execution"]["frozen_shared_mib"] > 0
        assert all(a["integrity"]["ok"] for a in runs[compiled]["arms"].values())
    for name, eager in runs[False]["arms"].items():
        assert runs[True]["arms"][name]["last_loss"] == pytest.approx(eager["last_loss"],
                                                                      rel=1e-4)
