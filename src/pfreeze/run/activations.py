"""Gradient (activation) checkpointing of one arm's blocks, from its lowest trained block up.

transformers' own switch (`activation_checkpointing_enable`, non-reentrant) wraps every
decoder block; the blocks below the lowest trained one are switched back off: nothing there
requires grad, so they store no activations anyway and a recompute would be wasted work.
Non-reentrant checkpointing needs no input that requires grad, so the hook transformers adds
to make the embeddings' output require grad (for the reentrant path) is removed again: with
it, frozen embeddings and frozen lower blocks would build a graph and keep their activations.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from pfreeze.models.families import FAMILIES


def lowest_trained_block(names: Iterable[str], family: str) -> int:
    """The index of the lowest block a trained tensor sits in; 0 where a trained tensor sits
    in no block (embeddings: every block is then on the gradient's path)."""
    block = re.compile(FAMILIES[family].block.lstrip("^"))
    lowest: int | None = None
    for name in names:
        m = block.search(name)  # search: a peft wrapper prefixes the names
        if m is None:
            return 0
        lowest = int(m.group(1)) if lowest is None else min(lowest, int(m.group(1)))
    return lowest or 0


def enable(model: nn.Module, lowest: int) -> int:
    """Checkpoint the blocks of `model` from block `lowest` up; the number of blocks."""
    from transformers import PreTrainedModel
    from transformers.modeling_layers import GradientCheckpointingLayer

    lm = next(m for m in model.modules() if isinstance(m, PreTrainedModel))
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers before activation_checkpointing_enable
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(lm, "_require_grads_hook"):
        lm.disable_input_require_grads()
    blocks = [m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer)]
    if len(blocks) == lm.config.num_hidden_layers:  # one per block, in order
        for b in blocks[:lowest]:
            b.gradient_checkpointing = False
    return sum(b.gradient_checkpointing for b in blocks)
