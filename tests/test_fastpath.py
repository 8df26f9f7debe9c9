"""The fast path computes what the plain path computes: compiled vs eager training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pfreeze.config import load_config
from pfreeze.errors import PfreezeError
from pfreeze.models import load_model
from pfreeze.train import Loop

STEPS = 3


def _train(corpus: Path, compiled: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    cfg = load_config(None, [
        f"data.corpus={corpus}", "model.name=random:llama", "data.block_size=16",
        "training.device=cpu",  # float32 on both paths; a GPU would autocast to bf16
        f"training.max_steps={STEPS}", "training.learning_rate=1e-2",
        "training.weight_decay=0.1", f"training.torch_compile={str(compiled).lower()}",
        "arms=[{kind: plan, select: 'layers=2: roles=q,k,v; roles=o heads=1'}]",
    ])
    lm = load_model(cfg.model.name, seed=0)
    loop = Loop(cfg, files=None)  # type: ignore[arg-type]
    loop.build_arms(lm.model, lm.family)
    arm = loop.arms[0]
    assert (arm.step_fn is not None) == compiled
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(STEPS):
        batch = torch.randint(0, 256, (2, 16), generator=gen)
        loop.train_step(arm, step, batch)
        losses.append(float(arm.pending[-1][1]))
    return losses, {n: p.detach().clone() for n, p in arm.model.named_parameters()}


@pytest.mark.slow
def test_compiled_loop_matches_eager(tmp_path: Path) -> None:
    corpus = tmp_path / "t.txt"
    corpus.write_text("abc " * 100)
    eager_losses, eager_w = _train(corpus, compiled=False)
    fast_losses, fast_w = _train(corpus, compiled=True)
    assert fast_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    # Compiled kernels reassociate fp32 sums; Adam's m/sqrt(v) amplifies that on tiny
    # gradients. 1e-4 is 0.3% of what lr=1e-2 moves a weight in three steps.
    for name, w in eager_w.items():
        assert (fast_w[name] - w).abs().max() <= 1e-4, name
    # Frozen elements are not just close but identical on both paths (whole frozen tensors,
    # and the frozen heads of the partially trainable o_proj).
    theta0 = dict(load_model("random:llama", seed=0).model.named_parameters())
    q0 = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(fast_w[q0], theta0[q0]) and torch.equal(eager_w[q0], theta0[q0])
    o0 = "model.layers.0.self_attn.o_proj.weight"  # heads=1 -> input columns 16:32 train
    frozen_cols = torch.ones(64, dtype=torch.bool)
    frozen_cols[16:32] = False
    for w in (fast_w, eager_w):
        assert torch.equal(w[o0][:, frozen_cols], theta0[o0][:, frozen_cols])
        assert not torch.equal(w[o0][:, 16:32], theta0[o0][:, 16:32])


def test_attention_backend_math_trains_like_auto_and_gpu_kernels_are_refused_on_cpu(
        make_config) -> None:
    losses = {}
    for backend in ("auto", "math"):
        cfg = make_config("model.name=random:llama", f"training.attention_backend={backend}")
        lm = load_model("random:llama", seed=0)
        loop = Loop(cfg, files=None)  # type: ignore[arg-type]
        loop.build_arms(lm.model, lm.family)
        x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
        loop.train_step(loop.arms[0], 0, x)
        losses[backend] = float(loop.arms[0].pending[-1][1])
    assert losses["math"] == pytest.approx(losses["auto"], rel=1e-5)
    with pytest.raises(PfreezeError, match="attention_backend=flash needs a CUDA GPU"):
        Loop(make_config("training.attention_backend=flash"), files=None)  # type: ignore
