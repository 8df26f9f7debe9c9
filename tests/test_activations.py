"""Gradient checkpointing (training.gradient_checkpointing): the same losses and updates as
without it, with frozen embeddings and frozen lower blocks; only the blocks from the lowest
trained one up are checkpointed, and fewer activations are kept."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from pfreeze.config import RunConfig
from pfreeze.models.load import load_model
from pfreeze.outputs.files import RunFiles
from pfreeze.run import activations
from pfreeze.run.loop import Loop
from pfreeze.run.session import run_loop

ARMS = ("arms=[{kind: full}, {kind: plan, name: upper, select: 'layers=2: roles=q,k,v'}, "
        "{kind: plan, name: mlp1, select: 'layers=1 roles=mlp; roles=norm'}]")


def _run(make_config: Callable[..., RunConfig], out: Path, *extra: str) -> Loop:
    loop = Loop(make_config("model.name=random:llama", ARMS, *extra), RunFiles(out))
    run_loop(loop)
    return loop


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_checkpointing_gives_the_same_losses_and_updates(
        make_config: Callable[..., RunConfig], tmp_path: Path, dtype: str) -> None:
    extra = (f"model.dtype={dtype}", "training.bf16=auto")
    plain = _run(make_config, tmp_path / "plain", *extra)
    ckpt = _run(make_config, tmp_path / "ckpt", *extra, "training.gradient_checkpointing=true")
    for a, b in zip(plain.arms, ckpt.arms, strict=True):
        assert b.losses == pytest.approx(a.losses, rel=1e-5), a.strategy.name
        pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
        for name in a.strategy.trained_names():
            torch.testing.assert_close(pb[name], pa[name], rtol=1e-4, atol=1e-5)
        assert b.freezer.audit()["ok"]


def _saved_bytes(model: nn.Module) -> int:
    """Bytes autograd keeps for the backward of one training forward."""
    kept = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal kept
        kept += t.numel() * t.element_size()
        return t

    x = torch.randint(0, 257, (2, 64))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
    return kept


def test_only_blocks_from_the_lowest_trained_one_are_checkpointed() -> None:
    assert activations.lowest_trained_block(
        ["model.layers.3.mlp.up_proj.weight", "model.layers.2.self_attn.q_proj.weight"],
        "llama") == 2
    assert activations.lowest_trained_block(["model.embed_tokens.weight"], "llama") == 0
    sizes = {}
    for gc in (False, True):
        model = load_model("random:llama").model.train()
        for name, p in model.named_parameters():  # frozen embeddings, blocks 0-1 frozen
            p.requires_grad_(".layers.2." in name or ".layers.3." in name)
        if gc:
            assert activations.enable(model, 2) == 2
        sizes[gc] = _saved_bytes(model)
    # Blocks 2-3 keep their inputs only; frozen blocks 0-1 keep nothing either way.
    assert sizes[True] < 0.5 * sizes[False]
