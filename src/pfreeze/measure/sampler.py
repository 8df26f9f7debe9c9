"""Fixed-length top-k sampling with no per-token host work: the decode step as one graph.

`transformers.generate` spends milliseconds of Python per token (logits processors, stopping
criteria, a host sync) and, with a static cache, attends over the cache with a mask built per
step. The p metric needs none of that: every sample has exactly `max_new_tokens` tokens and
EOS is suppressed. This sampler keeps each layer's keys and values in static buffers of its
own, filled by an attention function registered with transformers' AttentionInterface (so
it works for any model whose attention goes through that interface and whose blocks know
their `layer_idx`; it serves the model_types listed in the registry's `sampler_model_types`,
each proven by a greedy-equality test against `generate`), and runs the decode step —
forward, EOS suppression, temperature, top-k, Gumbel-max draw — with static shapes, so on a
GPU it is captured once in a CUDA graph and replayed per token.

Sampling is exact: Gumbel-max over the top-k logits draws from softmax(top-k logits / T),
which is what top-k sampling is. The noise is drawn up front from a seeded generator.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pfreeze.models.attention import attention_function, sdpa_heads
from pfreeze.models.families import sampler_model_types

DECODE = "pfreeze_decode"


class KVState:
    """Static K/V buffers of every block, the next write position, and the left padding."""

    def __init__(self, pad: torch.Tensor, length: int) -> None:
        self.pad = pad  # [B] number of left-padding tokens per row
        self.length = length
        self.pos = torch.zeros((), dtype=torch.long, device=pad.device)  # first slot to write
        # Read by the captured graph at every replay, advanced outside it: fixed addresses.
        torch._dynamo.mark_static_address(self.pos)
        torch._dynamo.mark_static_address(self.pad)
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def buffers(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.k:
            b, h, _, d = like.shape
            for store in (self.k, self.v):
                store[layer] = like.new_zeros(b, h, self.length, d)
                # Written in place inside the captured graph: the address must never change.
                torch._dynamo.mark_static_address(store[layer])
        return self.k[layer], self.v[layer]


def decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None,
                     dropout: float = 0.0, scaling: float | None = None,
                     sliding_window: int | None = None, softcap: float | None = None,
                     **_: Any) -> tuple[torch.Tensor, None]:
    """Append this call's keys/values to the layer's buffers and attend over the filled part.

    `sliding_window` (Mistral, Qwen2/3, Gemma 2/3 local layers) and `softcap` (Gemma 2) are
    what the model's attention hands its kernel; the window counts slots as transformers'
    mask does (left padding included), so both decode what `generate` decodes."""
    state: KVState = module._pfreeze_kv
    keys, values = state.buffers(module.layer_idx, key)
    n = query.shape[2]
    slots = state.pos + torch.arange(n, device=query.device)
    keys.index_copy_(2, slots, key.to(keys.dtype))
    values.index_copy_(2, slots, value.to(values.dtype))
    j = torch.arange(state.length, device=query.device)
    # Key j is visible to the query at slot s if j <= s and j is not left padding; a padding
    # query sees itself only (its output is never used, but must not be NaN).
    seen = (j <= slots[:, None]) & (j >= state.pad[:, None, None])
    if sliding_window is not None:
        seen = seen & (j > slots[:, None] - sliding_window)
    allowed = (seen | (j == slots[:, None]))[:, None]  # [B, 1, n, length]
    k, v = keys.to(query.dtype), values.to(query.dtype)
    if softcap is None:
        return sdpa_heads(query, k, v, attn_mask=allowed, scale=scaling), None
    return _softcapped(query, k, v, allowed, scaling, softcap), None


def _softcapped(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                allowed: torch.Tensor, scaling: float | None, softcap: float) -> torch.Tensor:
    """Attention with the logits squashed by softcap·tanh(·/softcap) before the mask, as
    Gemma 2's eager attention computes it (no fused kernel takes a softcap)."""
    n = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(n, dim=1), value.repeat_interleave(n, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    logits = torch.matmul(query, key.transpose(2, 3)) * scale
    logits = torch.tanh(logits / softcap) * softcap
    logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous()


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that know their block: the attention modules among them read the state."""
    return [m for m in model.modules() if hasattr(m, "layer_idx")]


def check(model: nn.Module, top_k: int | None) -> None:
    """Refuse, in one line, a model or setting this sampler cannot serve."""
    from pfreeze.errors import PfreezeError

    kind = getattr(model.config, "model_type", None)
    served = sampler_model_types()  # the families' sampler_model_types, from the registry
    if kind not in served or top_k is None:
        raise PfreezeError(
            f"generation.decoder=pfreeze needs generation.top_k and a model of type "
            f"{', '.join(served)} (this one: {kind})", "use generation.decoder=generate")
    if getattr(model.config, "alibi", False):  # Falcon's RW layout: the bias rides the mask
        raise PfreezeError("pfreeze's sampler does not apply ALiBi position biases",
                           "use generation.decoder=generate")


def resolve(decoder: str, model: nn.Module, top_k: int | None, device: torch.device) -> str:
    """The decoder sampling uses: `decoder` once checked; for auto, pfreeze on a GPU where it
    can serve the model (its gain is the CUDA graph; on the CPU generate stays, the sampler
    the README's demo figures were drawn with)."""
    if decoder == "pfreeze":
        check(model, top_k)
    if decoder != "auto":
        return decoder
    return "generate" if why_not(model, top_k, device) else "pfreeze"


def why_not(model: nn.Module, top_k: int | None, device: torch.device) -> str | None:
    """Why `auto` samples with transformers' generate rather than this sampler (None: it
    does not), in words for the summary."""
    from pfreeze.errors import PfreezeError

    if device.type != "cuda":
        return "on the CPU generate is kept (this sampler's gain is its CUDA graph)"
    try:
        check(model, top_k)
    except PfreezeError as e:
        return e.problem.replace("generation.decoder=pfreeze needs", "pfreeze's sampler needs")
    return None


@torch.no_grad()
def sample(model: nn.Module, input_ids: torch.Tensor, pad: torch.Tensor, new_tokens: int,
           top_k: int, temperature: float, eos: int | None, seed: int, bf16: bool,
           graph: bool) -> torch.Tensor:
    """[B, new_tokens] sampled ids after the left-padded prompts `input_ids` (pads per row).

    `graph`: compile the decode step with CUDA graphs (GPU); otherwise it runs eagerly.
    """
    dev = input_ids.device
    b, p = input_ids.shape
    k = min(top_k, model.config.vocab_size)
    gen = torch.Generator(device=dev).manual_seed(seed)
    uniform = torch.rand(new_tokens, b, k, generator=gen, device=dev).clamp_(1e-20, 1.0)
    gumbel = -torch.log(-torch.log(uniform))  # [new_tokens, B, k]
    state = KVState(pad.to(dev), p + new_tokens)
    attn = _attention_modules(model)

    def amp() -> torch.autocast:
        # Made inside the step, not captured: dynamo guards on captured objects, and a new
        # autocast object per call would recompile the step at every call.
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)

    def draw(logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if eos is not None:  # every sample is exactly new_tokens long
            logits[:, eos] = float("-inf")
        top, idx = (logits / temperature).topk(k, dim=-1)
        return idx.gather(-1, (top + noise).argmax(-1, keepdim=True))  # [B, 1]

    def step(tok: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        positions = (state.pos - state.pad).clamp(min=0)[:, None]
        with amp():
            logits = model(input_ids=tok, position_ids=positions, use_cache=False).logits
        return draw(logits[:, -1], noise)

    out = torch.empty(b, new_tokens, dtype=torch.long, device=dev)
    try:
        for m in attn:
            m._pfreeze_kv = state
        with attention_function(model, DECODE, decode_attention):
            # Prefill: every prompt position at once (eager: it runs once).
            positions = (torch.arange(p, device=dev)[None] - state.pad[:, None]).clamp(min=0)
            with amp():
                logits = model(input_ids=input_ids, position_ids=positions,
                               use_cache=False).logits
            out[:, 0:1] = draw(logits[:, -1], gumbel[0])
            state.pos.fill_(p)
            fn = torch.compile(step, mode="reduce-overhead", dynamic=False) if graph else step
            for t in range(1, new_tokens):
                out[:, t : t + 1] = fn(out[:, t - 1 : t].clone(), gumbel[t])
                state.pos.add_(1)
    finally:
        for m in attn:
            m.__dict__.pop("_pfreeze_kv", None)
    return out
