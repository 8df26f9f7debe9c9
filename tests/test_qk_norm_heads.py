"""What `heads=` means where q/k norms sit after the projection (README, "Heads and q/k norms").

OLMo 2 and OLMoE normalize the whole q (and k) projection at once: one RMS over every head's
channels. Training head 1's q rows leaves head 0's rows bit-identical, but rescales head 0's
normalized query (one factor per token: its attention temperature). Qwen3 and Gemma 3
normalize each head over head_dim alone: head 0's normalized query does not move."""

from __future__ import annotations

import pytest
import torch

from pfreeze.models.load import load_model
from pfreeze.plan.selectors import compile_plan


def _normed_queries(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Block 0's q_norm output as [B, T, heads, head_dim]."""
    got = []
    attn = model.model.layers[0].self_attn
    hook = attn.q_norm.register_forward_hook(lambda m, i, o: got.append(o.detach().clone()))
    with torch.no_grad():
        model(input_ids=x)
    hook.remove()
    q, heads = got[0], model.config.num_attention_heads
    if q.ndim == 4 and q.shape[1] == heads:  # Gemma 3 normalizes after the head transpose
        q = q.transpose(1, 2)
    return q.reshape(*x.shape, heads, -1)


@pytest.mark.parametrize(("name", "coupled"), [("olmo2", True), ("olmoe", True),
                                               ("qwen3", False), ("gemma3", False)])
def test_a_head_selection_under_q_norm(name: str, coupled: bool) -> None:
    lm = load_model(f"random:{name}", seed=0)
    model = lm.model.eval()
    plan = compile_plan(model, lm.family, "layers=0 roles=q heads=1")
    (qname, tp), = plan.tensors.items()
    assert qname == "model.layers.0.self_attn.q_proj.weight"
    x = torch.randint(0, 250, (2, 8), generator=torch.Generator().manual_seed(0))
    before = _normed_queries(model, x)
    q = dict(model.named_parameters())[qname]
    with torch.no_grad():  # what training may do to head 1's rows, and only to them
        q[tp.mask] += torch.randn(int(tp.mask.sum()), generator=torch.Generator().manual_seed(1))
    after = _normed_queries(model, x)
    assert not torch.equal(after[:, :, 1], before[:, :, 1])
    if not coupled:
        assert torch.equal(after[:, :, 0], before[:, :, 0])
        return
    assert not torch.allclose(after[:, :, 0], before[:, :, 0], atol=1e-3)
    ratio = after[:, :, 0] / before[:, :, 0]  # one factor per token: a rescaled head 0
    assert torch.allclose(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-4)
