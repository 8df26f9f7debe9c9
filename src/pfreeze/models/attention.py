"""transformers' attention interface, from outside: run a function of ours as a model's attention
for the duration of a block (registered under a name; transformers builds no mask for it), and
SDPA on the [batch, heads, T, head_dim] layout that such a function receives."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_registered: set[str] = set()


def sdpa_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               native_gqa: bool = False, **kw: Any) -> torch.Tensor:
    """SDPA on transformers' [B, heads, T, D] layout, returned as the [B, T, heads, D] an
    attention function hands back. Grouped KV heads (each serving n query heads) go to the
    kernel as they are with `native_gqa` (flash reads them in place: no faster than copies,
    but less memory reserved), else repeated (the masked kernels the sampler gets take no
    grouped heads)."""
    if key.shape[1] != query.shape[1]:
        if native_gqa:
            kw["enable_gqa"] = True
        else:
            n = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(n, dim=1), value.repeat_interleave(n, dim=1)
    return F.scaled_dot_product_attention(query, key, value, **kw).transpose(1, 2).contiguous()


@contextmanager
def attention_function(model: nn.Module, name: str, fn: Any) -> Iterator[None]:
    """Inside: `model`'s attention runs `fn` (registered with transformers' AttentionInterface
    as `name`; transformers builds no mask for it). The model's own attention after."""
    if name not in _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, lambda *args, **kwargs: None)
        _registered.add(name)
    config = model.config
    old = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = old

