"""Which attention kernel a training step uses, and a mask-free causal path for FlashAttention.

Why the causal path: while torch.compile traces a step, transformers (with torch < 2.14)
always builds an explicit [B, 1, T, T] boolean causal mask, and SDPA's flash kernel refuses
explicit masks. The compiled step then runs cuDNN's masked kernel, a large share of the
step's GPU time. Training windows have no padding and as many keys as queries,
so `is_causal=True` is exact there: the step swaps in an attention function that passes it,
registered with transformers' AttentionInterface, only for the duration of the training
forward. Evaluation and sampling (padding, KV caches) keep the model's own attention.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pfreeze.models.attention import attention_function, sdpa_heads

CAUSAL, PROBE = "pfreeze_causal", "pfreeze_probe"
# The mask-free causal path: flash restricts SDPA to FlashAttention, sdpa lets SDPA pick the
# kernel (faster in pfreeze's step: docs/BENCHMARKS.md).
CAUSAL_BACKENDS = ("flash", "sdpa")
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}






def causal_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None,
                     dropout: float = 0.0, scaling: float | None = None,
                     sliding_window: int | None = None, softcap: float | None = None, **_: Any
                     ) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; q, k, v are [batch, heads, T, head_dim]."""
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        # Only unpadded, cache-free windows may come here; anything else would be wrong.
        raise RuntimeError("pfreeze's causal attention got a mask or a KV cache")
    if (sliding_window is not None and sliding_window < key.shape[2]) or softcap is not None:
        raise RuntimeError("pfreeze's causal attention has no sliding window or soft-capping")
    return sdpa_heads(query, key, value, native_gqa=True, dropout_p=dropout, scale=scaling,
                      is_causal=True), None


def check_backend(backend: str, device: torch.device, bf16: bool, model: nn.Module | None,
                  block: int) -> None:
    """Refuse, in one line, a backend that cannot run (or would compute something else) here."""
    from pfreeze.errors import PfreezeError

    fix = "use training.attention_backend=auto"
    if backend in ("auto", "model"):
        return
    if device.type != "cuda" and backend in ("cudnn", "efficient"):
        raise PfreezeError(f"attention_backend={backend} needs a CUDA GPU", f"{fix} on this device")
    if device.type == "cuda" and backend in ("flash", "cudnn") and not bf16:
        raise PfreezeError(f"attention_backend={backend} needs bf16 on a GPU (its kernels take "
                           "no float32)", f"set training.bf16=true, or {fix}")
    if model is None or backend not in CAUSAL_BACKENDS:
        return
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True) and window < block:
        raise PfreezeError(f"attention_backend={backend} has no sliding window (this model's "
                           f"is {window} tokens, windows are {block})", fix)
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        raise PfreezeError(f"attention_backend={backend} has no attention soft-capping (this "
                           "model uses it)", fix)
    drop = max(float(getattr(cfg, k, 0.0) or 0.0) for k in ("attention_dropout", "attn_pdrop"))
    if device.type != "cuda" and drop > 0:
        raise PfreezeError(f"attention_backend={backend} on the CPU has no attention dropout, "
                           f"but this model's is {drop}", fix)


_probed: list[nn.Module] = []  # attention modules the probe ran in (registration is once)


def _probe(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask: torch.Tensor | None, scaling: float | None = None, **_: Any
           ) -> tuple[torch.Tensor, None]:
    _probed.append(module)
    return sdpa_heads(query, key, value, scale=scaling, is_causal=True), None


def routes_attention(model: nn.Module) -> bool:
    """Whether `model`'s attention calls transformers' registered attention functions (GPT-Neo's,
    for one, does not): a 2-token forward with a probe registered in their place."""
    _probed.clear()
    ids = torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad(), attention_function(model, PROBE, _probe):
        model(input_ids=ids, use_cache=False)
    n = len(_probed)
    _probed.clear()  # no module outlives the probe here
    return n > 0


def resolve_backend(backend: str, device: torch.device, bf16: bool, model: nn.Module,
                    block: int, graphs: bool) -> str:
    """The kernel training steps use: `backend` once checked. auto: sdpa (the mask-free causal
    path, SDPA picking the kernel) where it is exact, runs and pays (a GPU, bf16, a model whose
    attention it reaches, no sliding window or soft-capping, and the step in CUDA graphs:
    without them, the path's extra host time made the frozen arm slower), else model. sdpa,
    not flash: faster per step (docs/BENCHMARKS.md)."""
    from pfreeze.errors import PfreezeError

    if backend != "auto":
        check_backend(backend, device, bf16, model, block)
        if backend in CAUSAL_BACKENDS and not routes_attention(model):
            kind = getattr(model.config, "model_type", "?")
            raise PfreezeError(f"attention_backend={backend} cannot reach this model's "
                               f"attention ({kind} does not call transformers' attention "
                               "functions)", "use training.attention_backend=model")
        return backend
    if device.type != "cuda" or not bf16 or not graphs:
        return "model"
    try:
        check_backend("sdpa", device, bf16, model, block)
    except PfreezeError:
        return "model"
    return "sdpa" if routes_attention(model) else "model"


@contextmanager
def training_attention(model: nn.Module, backend: str) -> Iterator[None]:
    """Around a training forward: `backend`'s kernel (a resolved one: not auto); for flash and
    sdpa, the mask-free causal path."""
    if backend == "auto":
        raise ValueError("training_attention takes a resolved backend (resolve_backend)")
    if backend == "model":
        yield
        return
    route = (attention_function(model, CAUSAL, causal_attention) if backend in CAUSAL_BACKENDS
             else nullcontext())
    kernel = sdpa_kernel(BACKENDS[backend]) if backend in BACKENDS else nullcontext()
    with route, kernel:
        yield
