"""SNR and gradient ranking of MoE expert tensors, per expert and role.

transformers stores a layer's experts as two 3-D parameters: `experts.gate_up_proj`
(E, 2I, H), expert e's rows [gate I | up I] applied as F.linear(x, W[e]), and
`experts.down_proj` (E, H, I). Each expert's gate, up and down is one ranked matrix, and the
selector a ranking prints trains exactly that expert's slice."""

from __future__ import annotations

import pytest
import torch

from pfreeze.models.load import load_model
from pfreeze.plan.rank import grad_scores, snr_score, snr_scores, top_selector
from pfreeze.plan.selectors import compile_plan

GU, DOWN = "model.layers.{}.mlp.experts.gate_up_proj", "model.layers.{}.mlp.experts.down_proj"


@pytest.mark.parametrize(("name", "inter"), [("mixtral", 128), ("qwen3-moe", 48), ("olmoe", 128)])
def test_snr_ranks_every_experts_gate_up_and_down_by_hand(name: str, inter: int) -> None:
    lm = load_model(f"random:{name}", seed=0)
    scores = snr_scores(lm.model, lm.family, {"experts"})
    assert {m.role for m in scores} == {"experts.gate", "experts.up", "experts.down"}
    assert len(scores) == 4 * 3 * 4  # blocks x matrices x experts
    params = dict(lm.model.named_parameters())
    by = {(m.name, m.role, m.expert): m for m in scores}
    for layer in range(4):
        gu, down = params[GU.format(layer)].detach(), params[DOWN.format(layer)].detach()
        for e in range(4):
            for role, w in (("gate", gu[e, :inter]), ("up", gu[e, inter:]), ("down", down[e])):
                key = GU if role != "down" else DOWN
                m = by[(key.format(layer), f"experts.{role}", e)]
                assert m.shape == tuple(w.shape)
                assert (m.snr, m.score) == pytest.approx(snr_score(w))
    m = by[(GU.format(2), "experts.up", 3)]
    assert m.label == f"{GU.format(2)}[3]"
    # mlp takes in experts (and the router, a 2-D matrix); attention roles do not.
    assert {m.role for m in snr_scores(lm.model, lm.family, {"mlp"})} == {
        "experts.gate", "experts.up", "experts.down", "router"}
    q = snr_scores(lm.model, lm.family, {"q"})
    assert q and all(m.expert is None for m in q)


def test_gradient_ranking_is_per_expert_and_unrouted_experts_score_zero() -> None:
    lm = load_model("random:mixtral", seed=0)
    model = lm.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, 250, (1, 2), generator=torch.Generator().manual_seed(0))
    scores = grad_scores(model, lm.family, [x], roles={"experts"})
    # By hand. Only the first token's prediction is in the loss, and it routes to 2 of 4
    # experts per layer: the others get zero gradients.
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    model(input_ids=x, labels=x).loss.backward()
    g = dict(model.named_parameters())[GU.format(1)].grad
    for e in range(4):
        m = next(s for s in scores if s.name == GU.format(1) and s.role == "experts.gate"
                 and s.expert == e)
        assert m.score == pytest.approx(float(torch.linalg.vector_norm(g[e, :128])), rel=1e-5)
    layer1 = [s for s in scores if s.layer == 1 and s.role == "experts.down"]
    assert sorted(s.score > 0 for s in layer1) == [False, False, True, True]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_the_top_selector_trains_exactly_the_ranked_experts_slices() -> None:
    lm = load_model("random:qwen3-moe", seed=0)
    scores = snr_scores(lm.model, lm.family, {"experts"})
    selector = top_selector(scores, 25)  # 4 of each type's 16 matrices
    plan = compile_plan(lm.model, lm.family, selector)
    want: dict[str, torch.Tensor] = {}
    for kind in ("experts.gate", "experts.up", "experts.down"):
        top = sorted((m for m in scores if m.role == kind), key=lambda m: -m.score)[:4]
        for m in top:
            mask = want.setdefault(m.name, torch.zeros(
                dict(lm.model.named_parameters())[m.name].shape, dtype=torch.bool))
            rows = {"experts.gate": slice(0, 48), "experts.up": slice(48, 96),
                    "experts.down": slice(None)}[kind]
            mask[m.expert, rows] = True
    assert set(plan.tensors) == set(want)
    for n, tp in plan.tensors.items():
        got = torch.ones_like(want[n]) if tp.mask is None else tp.mask
        assert torch.equal(got, want[n]), n
    assert plan.trainable == 4 * (48 * 64 + 48 * 64 + 64 * 48)


def test_pfreeze_rank_names_each_expert_and_prints_a_selector_that_compiles() -> None:
    from typer.testing import CliRunner

    from pfreeze.cli import app

    result = CliRunner().invoke(app, ["rank", "--model", "random:olmoe", "--roles", "experts",
                                      "--top", "25", "--limit", "0"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for e in range(4):
        assert f"{GU.format(0)}[{e}]" in result.output
    selector = result.output.split("selector:")[1].replace("\n", "").strip()
    lm = load_model("random:olmoe", seed=0)
    # 25% of each type's 16 matrices: 4 gate, 4 up, 4 down matrices of single experts.
    assert compile_plan(lm.model, lm.family, selector).trainable == 4 * 3 * 128 * 64
