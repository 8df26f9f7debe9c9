"""Every supported family, on tiny random-init models: each role is found, training Q alone
keeps K, V and everything else bit-identical, and single heads and experts are exactly the
rows written here by hand (from the layouts in transformers' modeling code, not from
`role_index`)."""

from __future__ import annotations

import pytest
import torch

from pfreeze.models.families import describe_params
from pfreeze.models.layouts import roles_in
from pfreeze.models.load import load_model
from pfreeze.plan.masks import Freezer
from pfreeze.plan.selectors import compile_plan
from pfreeze.run.arm_run import build_optimizer
from pfreeze.settings import TrainingConfig

DENSE = {"q", "k", "v", "o", "gate", "up", "down", "embed", "norm", "head"}  # head: tied or not
PLAIN = {"q", "k", "v", "o", "up", "down", "embed", "norm", "head"}  # no gated MLP
MOE = DENSE | {"router", "experts"}


def _r(*spans: tuple[int, int]) -> list[int]:
    return [i for a, b in spans for i in range(a, b)]


# random:<name> -> (roles it has, {block-0 tensor: (dim, its q rows)}, the same for k head 1).
# hd = 16 (32 for qwen3/gemma), 4 q heads, 2 KV heads; a tensor without rows is whole.
ZOO: dict[str, tuple[set[str], dict[str, tuple[int, list[int] | None]],
                     dict[str, tuple[int, list[int] | None]]]] = {}
for _n, _roles, _hd in [("llama", DENSE, 16), ("mistral", DENSE | {"head"}, 16),
                        ("granite", DENSE | {"head"}, 16), ("qwen2", DENSE | {"head"}, 16),
                        ("qwen3", DENSE | {"head"}, 32), ("gemma", DENSE, 32),
                        ("gemma2", DENSE, 32), ("gemma3", DENSE, 32),
                        ("olmo", DENSE - {"norm"} | {"head"}, 16), ("olmo2", DENSE | {"head"}, 16),
                        ("stablelm", DENSE | {"head"}, 16), ("mixtral", MOE | {"head"}, 16),
                        ("qwen3-moe", MOE | {"head"}, 32), ("olmoe", MOE | {"head"}, 16),
                        ("phimoe", MOE | {"head"}, 16)]:
    _q = "model.layers.0.self_attn.q_proj."
    _k = "model.layers.0.self_attn.k_proj."
    _bias = _n in ("qwen2", "stablelm", "phimoe")
    ZOO[_n] = (_roles, {_q + s: (0, None) for s in ("weight", "bias")[:1 + _bias]},
               {_k + s: (0, _r((_hd, 2 * _hd))) for s in ("weight", "bias")[:1 + _bias]})
# Phi-3 qkv_proj rows: [q 4×16 | k 2×16 | v 2×16].
ZOO["phi3"] = (DENSE | {"head"}, {"model.layers.0.self_attn.qkv_proj.weight": (0, _r((0, 64)))},
               {"model.layers.0.self_attn.qkv_proj.weight": (0, _r((80, 96)))})
_FQKV = "transformer.h.0.self_attention.query_key_value."
# Grouped: per KV group [q, q, k, v] of 16 rows: q = 0:32, 64:96; k of group 1 = 96:112.
ZOO["falcon"] = (PLAIN, {_FQKV + "weight": (0, _r((0, 32), (64, 96)))},
                 {_FQKV + "weight": (0, _r((96, 112)))})
# Multi-query: [q 4×16 | k 16 | v 16]; its one KV head is head 0 (rows 64:80).
ZOO["falcon-mq"] = (PLAIN, {_FQKV + "weight": (0, _r((0, 64)))},
                    {_FQKV + "weight": (0, _r((64, 80)))})
# Multi-head: per head [q, k, v]: q = 0:16, 48:64, 96:112, 144:160; k of head 1 = 64:80.
_MH_Q = _r((0, 16), (48, 64), (96, 112), (144, 160))
ZOO["falcon-mh"] = (PLAIN, {_FQKV + s: (0, _MH_Q) for s in ("weight", "bias")},
                    {_FQKV + s: (0, _r((64, 80))) for s in ("weight", "bias")})
ZOO["gpt-neox"] = (PLAIN | {"head"},
                   {f"gpt_neox.layers.0.attention.query_key_value.{s}": (0, _MH_Q)
                    for s in ("weight", "bias")},
                   {f"gpt_neox.layers.0.attention.query_key_value.{s}": (0, _r((64, 80)))
                    for s in ("weight", "bias")})
# GPT-2's Conv1D c_attn is (in, out): q, k, v are column blocks of 64; the bias likewise.
ZOO["gpt2"] = (PLAIN, {"transformer.h.0.attn.c_attn.weight": (1, _r((0, 64))),
                       "transformer.h.0.attn.c_attn.bias": (0, _r((0, 64)))},
               {"transformer.h.0.attn.c_attn.weight": (1, _r((80, 96))),
                "transformer.h.0.attn.c_attn.bias": (0, _r((80, 96)))})
ZOO["gpt-neo"] = (PLAIN, {"transformer.h.0.attn.attention.q_proj.weight": (0, None)},
                  {"transformer.h.0.attn.attention.k_proj.weight": (0, _r((16, 32)))})
ZOO["gptj"] = (PLAIN | {"head"}, {"transformer.h.0.attn.q_proj.weight": (0, None)},
               {"transformer.h.0.attn.k_proj.weight": (0, _r((16, 32)))})


def _expected(model: torch.nn.Module, rows: dict[str, tuple[int, list[int] | None]]
              ) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    out = {}
    for name, (dim, idx) in rows.items():
        mask = torch.zeros(params[name].shape, dtype=torch.bool)
        if idx is None:
            mask[...] = True
        else:
            mask.index_fill_(dim, torch.tensor(idx), True)
        out[name] = mask
    return out


def _plan_masks(model: torch.nn.Module, family: str, selector: str) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    plan = compile_plan(model, family, selector)
    return {n: torch.ones(params[n].shape, dtype=torch.bool) if t.mask is None else t.mask
            for n, t in plan.tensors.items()}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_roles_and_hand_computed_rows(name: str) -> None:
    roles, q_rows, k1_rows = ZOO[name]
    lm = load_model(f"random:{name}")
    infos = describe_params(lm.model, lm.family)
    assert "other" not in {i.rule.role for i in infos.values()}
    assert {r for i in infos.values() for r in roles_in(i)} == roles
    got = _plan_masks(lm.model, lm.family, "layers=0 roles=q")
    want = _expected(lm.model, q_rows)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n]) for n in want), name
    head = 0 if name == "falcon-mq" else 1  # multi-query has one KV head
    got = _plan_masks(lm.model, lm.family, f"layers=0 roles=k heads={head}")
    want = _expected(lm.model, k1_rows)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n]) for n in want), name


@pytest.mark.parametrize("name", sorted(ZOO))
def test_training_q_alone_keeps_everything_else_bit_identical(name: str) -> None:
    lm = load_model(f"random:{name}")
    model, family = lm.model.train(), lm.family
    plan = compile_plan(model, family, "roles=q")
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    freezer = Freezer(model)
    freezer.apply(plan)
    cfg = TrainingConfig(optim="adamw", learning_rate=1e-2, weight_decay=0.1, device="cpu")
    opt = build_optimizer(freezer.trainable(), cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randint(0, 257, (2, 16), generator=gen)
        model(input_ids=x, labels=x).loss.backward()
        freezer.mask_grads()
        opt.step()
        opt.zero_grad(set_to_none=True)
        freezer.restore()
    q_block0 = _expected(model, ZOO[name][1])
    for n, p in model.named_parameters():
        trained = plan.tensors.get(n)
        keep = torch.ones(p.shape, dtype=torch.bool)
        if trained is not None:
            keep = torch.zeros_like(keep) if trained.mask is None else ~trained.mask
        assert torch.equal(p.detach()[keep], theta0[n][keep]), f"{n} moved outside q"
        if n in q_block0:  # block 0's q rows (hand-computed) are exactly what trained
            assert torch.equal(~keep, q_block0[n]), n
            assert not torch.equal(p.detach()[~keep], theta0[n][~keep]), f"{n} q did not move"


@pytest.mark.parametrize(("name", "inter"), [("mixtral", 128), ("qwen3-moe", 48), ("olmoe", 128),
                                             ("phimoe", 128)])
def test_single_experts_are_exactly_their_slabs(name: str, inter: int) -> None:
    lm = load_model(f"random:{name}")
    gu, down = "model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"
    got = _plan_masks(lm.model, lm.family, "layers=1 roles=experts experts=0,3")
    assert set(got) == {gu, down}
    for n in (gu, down):
        assert got[n][[0, 3]].all() and not got[n][[1, 2]].any()
    got = _plan_masks(lm.model, lm.family, "layers=1 roles=up experts=2")
    assert set(got) == {gu}
    want = torch.zeros(got[gu].shape, dtype=torch.bool)
    want[2, inter:2 * inter] = True  # [gate I | up I] rows of expert 2
    assert torch.equal(got[gu], want)
    router = _plan_masks(lm.model, lm.family, "layers=1 roles=router")
    router_name = "router" if name == "phimoe" else "gate"  # PhiMoE: mlp.router
    assert set(router) == {f"model.layers.1.mlp.{router_name}.weight"}


def test_family_errors_say_what_to_do() -> None:
    from pfreeze.errors import PfreezeError
    from pfreeze.run.arms import make_arm
    from pfreeze.run.arms.lora import LoraArm

    llama = load_model("random:llama")
    with pytest.raises(PfreezeError, match=r"no parameters with role \['router'\]"):
        compile_plan(llama.model, llama.family, "roles=router")
    with pytest.raises(PfreezeError, match="experts= but this llama model has no experts"):
        compile_plan(llama.model, llama.family, "roles=mlp experts=0")
    moe = load_model("random:mixtral")
    with pytest.raises(PfreezeError, match="only 4 experts per layer"):
        compile_plan(moe.model, moe.family, "roles=experts experts=4")
    phi = load_model("random:phi3")
    arm = make_arm(LoraArm(select="roles=q"), phi.family)
    with pytest.raises(PfreezeError, match="part of the fused .*qkv_proj.weight.*roles=q,k,v"):
        arm.build(phi.model)
    arm = make_arm(LoraArm(select="roles=experts"), moe.family)
    with pytest.raises(PfreezeError, match="selects MoE experts"):
        arm.build(moe.model)


def test_an_unknown_model_type_with_llama_names_is_inferred() -> None:
    from pfreeze.errors import PfreezeError
    from pfreeze.models.families import FAMILIES
    from pfreeze.models.load import family_of

    model = load_model("random:qwen2").model
    model.config.model_type = "mylm"  # no entry covers it; its names follow the conventions
    try:
        assert family_of(model) == "inferred:mylm"
        mine, qwen = describe_params(model, "inferred:mylm"), describe_params(model, "llama")
        assert {n: i.rule.role for n, i in mine.items()} == {
            n: i.rule.role for n, i in qwen.items()}
        plan = compile_plan(model, "inferred:mylm", "layers=50%: roles=q,k,v")
        assert plan.trainable == compile_plan(model, "llama", "layers=50%: roles=q,k,v").trainable
    finally:
        FAMILIES.pop("inferred:mylm", None)
    gpt2 = load_model("random:gpt2").model
    gpt2.config.model_type = "mygpt"  # transformer.h.N.attn.c_attn: nothing to infer from
    with pytest.raises(PfreezeError, match="do not follow the Llama conventions"):
        family_of(gpt2)
    assert "inferred:mygpt" not in FAMILIES


@pytest.mark.parametrize(("name", "keys"), [
    ("phi3", ["L0.q", "L0.k", "L0.v", "L0.o", "L0.gate", "L0.up", "L0.down"]),
    ("mixtral", ["L0.q", "L0.k", "L0.v", "L0.o", "L0.router", "L0.gate", "L0.up", "L0.down"]),
    ("falcon", ["L0.q", "L0.k", "L0.v", "L0.o", "L0.up", "L0.down"]),
])
def test_drift_splits_every_fused_matrix_per_role(name: str, keys: list[str]) -> None:
    from pfreeze.measure.drift import Tracker

    lm = load_model(f"random:{name}")
    infos = describe_params(lm.model, lm.family)
    tracker = Tracker(lm.model, infos, list(infos))
    assert sorted(k for k in tracker.keys if k.startswith("L0.")) == sorted(keys)
    params = dict(lm.model.named_parameters())
    with torch.no_grad():  # move k head 1's rows of block 0 (by hand): only L0.k may change
        for n, mask in _expected(lm.model, ZOO[name][2]).items():
            rows = mask.any(1) if mask.ndim == 2 else mask
            params[n][rows if n.endswith("weight") else mask] += 1.0
    _, d0 = tracker.step()
    moved = {k for k, v in zip(tracker.keys, d0.tolist(), strict=True) if v > 0}
    assert moved == {"L0.k"}
