"""Held-out loss: the mean next-token loss of a model over fixed windows of text.

The windows are fixed (spread evenly over the text, deterministic), so every arm and every
moment (before, during, after training) is measured on exactly the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn


def fixed_windows(ids: Sequence[int], block: int, count: int) -> torch.Tensor:
    """`count` windows of `block` tokens spread evenly over `ids` (deterministic)."""
    span = block
    n_fit = len(ids) // span
    k = min(count, n_fit)
    if k <= 0:
        return torch.zeros(0, span, dtype=torch.long)
    # Window i of k sits at round(i * (n_fit - 1) / (k - 1)), in integers: k <= n_fit makes the
    # spacing >= 1, so the k picks are distinct (asking for more than fit returns all of them).
    picks = [(2 * i * (n_fit - 1) + (k - 1)) // (2 * (k - 1)) if k > 1 else 0 for i in range(k)]
    t = torch.tensor(ids[: n_fit * span], dtype=torch.long).view(n_fit, span)
    return t[picks]


def autocast(device: torch.device, bf16: bool):  # noqa: ANN201 - context manager
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


@torch.no_grad()
def mean_loss(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
              bf16: bool) -> float | None:
    """Token-weighted mean next-token loss over fixed windows; None if there are none."""
    if len(windows) == 0:
        return None
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    for i in range(0, len(windows), batch_size):
        x = windows[i : i + batch_size].to(device)
        with autocast(device, bf16):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        total += loss.double() * len(x)
    model.train(was_training)
    return float(total / len(windows))

