"""What the benchmark's modules and scripts share: the shapes, the arms, a one-arm Loop."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pfreeze import BatchStream, DataConfig, Loop, RunConfig, TrainingConfig

Row = dict[str, Any]  # one JSON row or result
SHAPES = {"smollm2": "random:smollm2-135m", "gpt2": "random:gpt2-124m", "tiny": "random:llama",
          "llama-1b": "random:llama-3.2-1b", "llama-8b": "random:llama-3.1-8b"}
ARMS = {"full": None, "frozen": "layers=50%: roles=q,k,v"}
Batches = list[torch.Tensor]  # token ids on the host, rotated through the steps
ROTATED = 4  # batches per case; a cached row's warm-up must see each once


def pfreeze_loop(base: nn.Module, family: str, arm: Any, batch: int, seq: int,
                 ids: list[int] | None = None, **training: Any) -> Loop:
    """A one-arm pfreeze Loop on `base` (arm: a FullArm or PlanArm config), built as the bench
    and the scripts in bench/ time it: no corpus, no run files. `ids` becomes its batch stream
    (epochs sampling when the arm caches its prefix, which needs aligned chunks; else random),
    `training` the TrainingConfig fields beyond the batch size."""
    t = TrainingConfig(per_device_train_batch_size=batch, **training)
    sampling = "epochs" if t.prefix_cache is True else "random"
    data = DataConfig(block_size=seq, sampling=sampling)
    loop = Loop(RunConfig(data=data, training=t, arms=[arm]))
    if ids is not None:
        loop.stream = BatchStream(ids, seq, batch, 0, sampling)
    loop.build_arms(base, family)
    return loop
