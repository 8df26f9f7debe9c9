"""Frozen means bit-identical: the Freezer against AdamW (decay, moments), SGD momentum and
mid-run plan changes, on all four architectures; plus the audit that proves it after a run.

Training mirrors train.Loop.train_step: backward -> mask_grads -> clip -> step -> restore.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from pfreeze.config import RunConfig
from pfreeze.errors import PfreezeError
from pfreeze.measure.drift import Tracker
from pfreeze.models.families import describe_params
from pfreeze.models.load import load_model
from pfreeze.plan.masks import Freezer, check_audit, optimizer_state_bytes
from pfreeze.plan.selectors import Plan, compile_plan
from pfreeze.run.arm_run import ArmRun, build_optimizer
from pfreeze.run.arms.schedule import PhaseConfig, ScheduleArm, Scheduled
from pfreeze.run.loop import Loop
from pfreeze.settings import TrainingConfig

CPU = torch.device("cpu")
FAMILIES = ("gpt2", "gpt-neo", "gpt-neox", "llama")
# Sub-tensor plans: heads inside (fused) attention matrices plus an explicit slice.
PARTIAL = {
    "gpt2": "roles=k heads=1; transformer.h.0.mlp.c_fc.weight[0:8, :]",
    "gpt-neo": "roles=o heads=1; transformer.h.0.mlp.c_fc.weight[:, 0:8]",
    "gpt-neox": "roles=v heads=0,2; gpt_neox.layers.1.mlp.dense_h_to_4h.weight[0:8, :]",
    "llama": "roles=k heads=1; model.layers.0.mlp.up_proj.weight[:, 0:16]",
}
WHOLE = "layers=-1:; roles=norm"  # whole tensors only: a block's matrices, every norm


@functools.cache
def _base(family: str) -> nn.Module:
    return load_model(f"random:{family}").model


def fresh(family: str) -> nn.Module:
    return copy.deepcopy(_base(family))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def training_config(optim: str, weight_decay: float = 0.1) -> TrainingConfig:
    lr = 0.05 if optim == "sgd" else 1e-2  # large enough that every trained tensor moves
    return TrainingConfig(optim=optim, learning_rate=lr, weight_decay=weight_decay,
                          momentum=0.9, max_grad_norm=1.0, device="cpu")


def make_optimizer(kind: str, params: list[nn.Parameter], weight_decay: float = 0.1
                   ) -> torch.optim.Optimizer:
    """adamw: the CPU default (per-tensor loop); adamw_foreach: multi-tensor; sgd: momentum."""
    opt = build_optimizer(params, training_config(kind.split("_")[0], weight_decay), CPU)
    for group in opt.param_groups:
        group["foreach"] = kind.endswith("foreach")
    return opt


def train(model: nn.Module, freezer: Freezer, opt: torch.optim.Optimizer, steps: int,
          seed: int = 0, restore: bool = True) -> None:
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    for _ in range(steps):
        x = torch.randint(0, 257, (2, 16), generator=gen).to(device)
        # bf16 autocast on CUDA, as the loop runs there; plain float32 on the CPU.
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        freezer.mask_grads()
        torch.nn.utils.clip_grad_norm_(freezer.trainable(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if restore:
            freezer.restore()


def union(*plans: Plan) -> dict[str, torch.Tensor | None]:
    """Per tensor, the elements some plan trains (None: all of them)."""
    out: dict[str, torch.Tensor | None] = {}
    for plan in plans:
        for name, tp in plan.tensors.items():
            if name in out and (out[name] is None or tp.mask is None):
                out[name] = None
            else:
                out[name] = tp.mask if name not in out else out[name] | tp.mask  # type: ignore
    return out


def assert_never_trained_unchanged(model: nn.Module, theta0: dict[str, torch.Tensor],
                                   trained: dict[str, torch.Tensor | None]) -> None:
    for name, p in model.named_parameters():
        if name not in trained:
            assert torch.equal(bits(p.detach()), bits(theta0[name])), f"{name} moved"
        elif (mask := trained[name]) is not None:
            mask = mask.to(p.device)
            assert torch.equal(bits(p.detach()[~mask]), bits(theta0[name][~mask])), \
                f"frozen elements of {name} moved"


def assert_trained_moved(model: nn.Module, theta0: dict[str, torch.Tensor],
                         trained: dict[str, torch.Tensor | None]) -> None:
    params = dict(model.named_parameters())
    for name, mask in trained.items():
        now, then = params[name].detach(), theta0[name]
        if mask is not None:
            now, then = now[mask.to(now.device)], then[mask.to(now.device)]
        assert not torch.equal(now, then), f"trainable {name} did not move"


@pytest.mark.parametrize("optim", ["adamw", "adamw_foreach", "sgd"])
@pytest.mark.parametrize("kind", ["partial", "whole"])
@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_elements_stay_bit_identical(family: str, kind: str, optim: str) -> None:
    model = fresh(family)
    plan = compile_plan(model, family, PARTIAL[family] if kind == "partial" else WHOLE)
    assert any(t.mask is not None for t in plan.tensors.values()) == (kind == "partial")
    theta0 = snapshot(model)
    freezer = Freezer(model)
    freezer.apply(plan)
    # Whole-frozen tensors never require grad; the optimizer sees only what trains.
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(plan.tensors)
    opt = make_optimizer(optim, freezer.trainable())
    train(model, freezer, opt, steps=3)
    trained = union(plan)
    assert_never_trained_unchanged(model, theta0, trained)
    assert_trained_moved(model, theta0, trained)
    if optim.startswith("adamw"):  # masked gradients: the moments never saw frozen elements
        for name, p in freezer.params.items():
            if (mask := trained.get(name)) is not None:
                assert not opt.state[p]["exp_avg"][~mask].any(), name
                assert not opt.state[p]["exp_avg_sq"][~mask].any(), name
    audit = freezer.audit()
    assert audit["ok"], audit["violations"]
    assert audit["frozen_tensors"] == len(theta0) - sum(m is None for m in trained.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused AdamW exists only on CUDA")
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_adamw_with_bf16_autocast_on_cuda(family: str) -> None:
    cuda = torch.device("cuda")
    model = fresh(family).to(cuda)
    plan = compile_plan(model, family, PARTIAL[family])
    theta0 = snapshot(model)
    freezer = Freezer(model)
    freezer.apply(plan)
    opt = build_optimizer(freezer.trainable(), training_config("adamw_fused"), cuda)
    assert opt.defaults["fused"]
    train(model, freezer, opt, steps=3)
    assert_never_trained_unchanged(model, theta0, union(plan))
    assert_trained_moved(model, theta0, union(plan))
    assert freezer.audit()["ok"]


@pytest.mark.parametrize("optim", ["adamw", "sgd"])
def test_without_restore_weight_decay_moves_masked_elements(optim: str) -> None:
    """The reason restore() exists: a zero gradient does not stop decoupled/coupled decay."""
    model = fresh("llama")
    plan = compile_plan(model, "llama", "roles=q heads=0")
    name = "model.layers.0.self_attn.q_proj.weight"
    frozen = ~plan.tensors[name].mask  # type: ignore[operator]
    theta0 = snapshot(model)
    freezer = Freezer(model)
    freezer.apply(plan)
    opt = make_optimizer(optim, freezer.trainable())
    steps = 3
    train(model, freezer, opt, steps=steps, restore=False)
    moved = dict(model.named_parameters())[name].detach()[frozen]
    assert not torch.equal(moved, theta0[name][frozen])
    if optim == "adamw":
        # Masked gradients leave both moments at 0, so decay alone moved them: θ·(1-lr·wd)^n.
        lr, wd = 1e-2, 0.1
        assert torch.allclose(moved, theta0[name][frozen] * (1 - lr * wd) ** steps, rtol=1e-5)
    assert not freezer.audit()["ok"]
    # The same run with restore() keeps them bit-identical.
    model2 = fresh("llama")
    freezer2 = Freezer(model2)
    freezer2.apply(plan)
    train(model2, freezer2, make_optimizer(optim, freezer2.trainable()), steps=steps)
    kept = dict(model2.named_parameters())[name].detach()[frozen]
    assert torch.equal(bits(kept), bits(theta0[name][frozen]))


def test_stale_momentum_after_a_plan_change_is_undone() -> None:
    """Heads trained under plan A, frozen under plan B, keep their end-of-A values exactly,
    although AdamW's moments for them are not zero (weight decay off: momentum alone)."""
    name = "model.layers.0.self_attn.q_proj.weight"
    results = {}
    for restore in (True, False):
        model = fresh("llama")
        a = compile_plan(model, "llama", "roles=q heads=0,1")
        b = compile_plan(model, "llama", "roles=q heads=2,3")
        freezer = Freezer(model)
        freezer.apply(a)
        opt = make_optimizer("adamw", freezer.trainable(), weight_decay=0.0)
        train(model, freezer, opt, steps=3)
        after_a = dict(model.named_parameters())[name].detach()[:32].clone()
        freezer.apply(b)
        train(model, freezer, opt, steps=3, seed=1, restore=restore)
        results[restore] = torch.equal(
            bits(dict(model.named_parameters())[name].detach()[:32]), bits(after_a))
    assert results == {True: True, False: False}


def test_plan_change_mid_run() -> None:
    model = fresh("llama")
    a = compile_plan(model, "llama", "roles=q heads=0")
    b = compile_plan(model, "llama", "roles=k heads=1; layers=0 roles=mlp")
    theta0 = snapshot(model)
    params = dict(model.named_parameters())
    freezer = Freezer(model)
    freezer.apply(a)
    # As in Loop.setup: the optimizer holds every tensor any plan will train, from the start.
    ever = [params[n] for n in sorted(set(a.tensors) | set(b.tensors))]
    opt = make_optimizer("adamw", ever)
    state_names = lambda: {n for n, p in params.items() if p in opt.state}  # noqa: E731
    train(model, freezer, opt, steps=3)
    assert state_names() == set(a.tensors)  # B's tensors had no gradient yet: no state
    freezer.apply(b)
    assert {n for n, p in params.items() if p.requires_grad} == set(b.tensors)
    q = "model.layers.2.self_attn.q_proj.weight"
    q_after_a = params[q].detach().clone()
    train(model, freezer, opt, steps=3, seed=1)
    assert state_names() == set(a.tensors) | set(b.tensors)
    assert not any(p in opt.state for n, p in params.items() if "v_proj" in n or "norm" in n)
    assert torch.equal(bits(params[q].detach()), bits(q_after_a))  # frozen under B
    trained = union(a, b)
    assert_never_trained_unchanged(model, theta0, trained)
    assert_trained_moved(model, theta0, trained)
    assert freezer.audit()["ok"]
    # The state the optimizer really allocated is what optimizer_state_bytes predicts.
    held = sum(s[k].nbytes for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
    assert held == optimizer_state_bytes([a, b], "adamw")


def test_loop_train_step_enforces_a_schedule() -> None:
    """The real loop step with a two-phase schedule, auditing after every step."""
    base = fresh("llama")
    theta0 = snapshot(base)
    phases = [PhaseConfig(start=0, select="roles=q heads=3"),
              PhaseConfig(start=2, select="roles=v heads=0; layers=1 roles=norm")]
    strat = Scheduled(ScheduleArm(name="sched", phases=phases), "llama")
    model = strat.build(base)
    freezer = Freezer(model)
    freezer.apply(strat.first_plan())
    t = training_config("adamw").model_copy(update={"integrity_steps": 1, "bf16": False})
    loop = Loop(RunConfig(training=t), files=None)  # type: ignore[arg-type]
    opt = build_optimizer([p for n, p in freezer.params.items() if n in strat.trained_names()],
                          t, CPU)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    arm = ArmRun(strat, model, freezer, opt, sched, Tracker(model, {}, []), "")
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        loop.train_step(arm, step, torch.randint(0, 257, (2, 16), generator=gen))
    plans = [p for p in strat.plans.values() if p is not None]
    assert_never_trained_unchanged(model, theta0, union(*plans))
    assert_trained_moved(model, theta0, union(*plans))


def _q_heads(family: str, module: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split a projection's output per the layout, written out by hand for each family."""
    out = module(x)
    if family == "gpt2":  # Conv1D c_attn: [q | k | v] along the output
        return {"q": out[..., 0:64], "k": out[..., 64:128], "v": out[..., 128:192]}
    if family == "gpt-neox":  # query_key_value: per head [q, k, v], 16 each
        per_head = out.view(*out.shape[:-1], 4, 48)
        return {"q": per_head[..., 0:16], "k": per_head[..., 16:32], "v": per_head[..., 32:48]}
    per_head = out.view(*out.shape[:-1], 4, 16)  # llama q_proj: 4 heads of 16
    return {"q01": per_head[..., 0:2, :], "q23": per_head[..., 2:4, :]}


@pytest.mark.parametrize(("family", "selector", "module", "changed", "unchanged"), [
    ("gpt2", "roles=q", "transformer.h.{}.attn.c_attn", ["q"], ["k", "v"]),
    ("gpt-neox", "roles=q", "gpt_neox.layers.{}.attention.query_key_value", ["q"], ["k", "v"]),
    ("llama", "roles=q heads=0,1", "model.layers.{}.self_attn.q_proj", ["q01"], ["q23"]),
])
def test_projections_of_frozen_parts_are_unchanged(family: str, selector: str, module: str,
                                                   changed: list[str],
                                                   unchanged: list[str]) -> None:
    model = fresh(family)
    before = copy.deepcopy(model)
    freezer = Freezer(model)
    freezer.apply(compile_plan(model, family, selector))
    train(model, freezer, make_optimizer("adamw", freezer.trainable()), steps=3)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i in range(4):
            new = _q_heads(family, model.get_submodule(module.format(i)), x)
            old = _q_heads(family, before.get_submodule(module.format(i)), x)
            for part in unchanged:
                assert torch.equal(bits(new[part]), bits(old[part])), f"block {i} {part}"
            for part in changed:
                assert not torch.equal(new[part], old[part]), f"block {i} {part}"


@pytest.mark.parametrize(("corrupt", "index"), [
    ("model.layers.0.self_attn.v_proj.weight", (0, 0)),  # wholly frozen tensor
    ("model.layers.1.self_attn.q_proj.weight", (40, 3)),  # frozen row (head 2) of a partial one
])
def test_audit_names_a_corrupted_frozen_element(corrupt: str, index: tuple[int, int]) -> None:
    model = fresh("llama")
    freezer = Freezer(model)
    freezer.apply(compile_plan(model, "llama", "roles=q heads=0"))
    train(model, freezer, make_optimizer("adamw", freezer.trainable()), steps=2)
    assert freezer.audit()["ok"]
    params = dict(model.named_parameters())
    with torch.no_grad():
        params["model.layers.1.self_attn.q_proj.weight"][0, 0] += 1.0  # trainable: allowed
    assert freezer.audit()["ok"]
    with torch.no_grad():
        params[corrupt][index] += 1e-3
    audit = freezer.audit()
    assert audit["ok"] is False and audit["violations"] == [corrupt]
    with pytest.raises(PfreezeError, match=f"arm 'a': frozen elements of {corrupt}"):
        check_audit("a", audit)


@pytest.mark.parametrize("later", ["roles=q heads=0", "roles=q"])
def test_audit_catches_a_tensor_that_moved_before_it_became_trainable(later: str) -> None:
    model = fresh("llama")
    name = "model.layers.0.self_attn.q_proj.weight"
    freezer = Freezer(model)
    freezer.apply(compile_plan(model, "llama", "roles=k"))
    with torch.no_grad():
        dict(model.named_parameters())[name][63, 0] += 1.0  # q_proj is wholly frozen here
    freezer.apply(compile_plan(model, "llama", later))  # partly or wholly trainable from now
    assert freezer.audit()["violations"] == [name]


def test_requires_grad_follows_the_plan_only() -> None:
    model = fresh("gpt2")
    freezer = Freezer(model)
    assert not any(p.requires_grad for p in model.parameters())  # nothing until a plan
    plan = compile_plan(model, "gpt2", "roles=q heads=0 layers=0")
    freezer.apply(plan)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == list(plan.tensors)
    for p in freezer.trainable():
        p.grad = torch.ones_like(p)
    freezer.apply(None)
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())


def test_mask_grads_zeroes_nan_and_inf_in_frozen_elements() -> None:
    model = fresh("llama")
    freezer = Freezer(model)
    freezer.apply(compile_plan(model, "llama", "model.layers.0.self_attn.q_proj.weight[0:16]"))
    (p,) = freezer.trainable()
    p.grad = torch.full_like(p, 0.5)
    p.grad[20, 0], p.grad[30, 1] = float("nan"), float("inf")  # rows 16: are frozen
    freezer.mask_grads()
    assert bool((p.grad[16:] == 0).all()) and bool((p.grad[:16] == 0.5).all())


def test_optimizer_state_bytes() -> None:
    model = _base("llama")
    q = compile_plan(model, "llama", "roles=q heads=0")  # 4 partial q_proj tensors of 64x64
    assert optimizer_state_bytes(q) == 2 * 4 * 4 * 64 * 64  # whole tensors: 2 fp32 moments
    assert optimizer_state_bytes(q, "sgd") == 4 * 4 * 64 * 64
    assert optimizer_state_bytes(q, "sgd", momentum=0.0) == 0
    k = compile_plan(model, "llama", "roles=k layers=0")  # one 32x64 tensor
    assert optimizer_state_bytes([q, None, k, q]) == 2 * 4 * (4 * 64 * 64 + 32 * 64)
    with pytest.raises(PfreezeError, match="unknown optimizer"):
        optimizer_state_bytes(q, "adam")


def test_describe_params_sees_the_tied_head() -> None:
    infos = describe_params(_base("llama"), "llama")
    assert infos["model.embed_tokens.weight"].tied == "lm_head"
    assert "lm_head.weight" not in infos  # one Parameter, listed once
