"""Generated text and its top-k share p: fixed prompts and seeds, one batch per moment.

Every arm and every moment (before, during, after training) samples the same prompts with the
same seeds, and every sample has exactly `max_new_tokens` tokens, so p compares like with like.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pfreeze.data.corpus import top_share
from pfreeze.measure.heldout import autocast
from pfreeze.measure.sampler import resolve as resolve_decoder
from pfreeze.measure.sampler import sample
from pfreeze.measure.stats import mean_ci
from pfreeze.settings import GenerationConfig


@dataclass
class Sample:
    prompt: str
    seed: int  # the sampling call's seed (all prompts and samples are drawn as one batch)
    index: int
    text: str
    ids: list[int]
    p: float


# Static KV cache + transformers' compiled decode step: many times the eager tokens/s, after
# a compile of tens of seconds. Worth it only for many tokens; the p metric's default is 384.
STATIC_CACHE_MIN_TOKENS = 32_768


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of unequal length as one batch: padding on the left, masked out."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@torch.no_grad()
def generate_samples(model: nn.Module, tokenizer, cfg: GenerationConfig, top_set: Collection[int],
                     device: torch.device, bf16: bool, static_cache: bool | None = None
                     ) -> list[Sample]:
    """Sample `samples_per_prompt` continuations of every prompt, all in one seeded batch.

    Every sample gets exactly `max_new_tokens` new tokens (EOS suppressed by min_new_tokens),
    so p is always a share of the same number of tokens. `static_cache` (default: on a GPU for
    at least STATIC_CACHE_MIN_TOKENS new tokens) decodes with a static KV cache, which
    transformers compiles; the sampling itself is the same.
    """
    was_training = model.training
    model.eval()
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = eos if eos is not None else 0
    prompts = [(p, tokenizer.encode(p) or [pad]) for p in cfg.prompts]
    rows = [(p, i, ids) for p, ids in prompts for i in range(cfg.samples_per_prompt)]
    x, mask = _left_padded([ids for _, _, ids in rows], pad)
    try:
        if resolve_decoder(cfg.decoder, model, cfg.top_k, device) == "pfreeze":
            new = sample(model, x.to(device), (mask == 0).sum(1), cfg.max_new_tokens,
                         cfg.top_k, cfg.temperature, eos, cfg.seed, bf16,
                         graph=device.type == "cuda")
        else:
            if static_cache is None:
                n_new = len(rows) * cfg.max_new_tokens
                static_cache = device.type == "cuda" and n_new >= STATIC_CACHE_MIN_TOKENS
            new = _generate(model, x.to(device), mask.to(device), cfg, pad, eos, device, bf16,
                            static_cache)
    finally:
        model.train(was_training)
    return [Sample(prompt, cfg.seed, i, tokenizer.decode(ids), ids, top_share(ids, top_set))
            for (prompt, i, _), ids in zip(rows, new.tolist(), strict=True)]


def _generate(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, cfg: GenerationConfig,
              pad: int, eos: int | None, device: torch.device, bf16: bool,
              static_cache: bool) -> torch.Tensor:
    """transformers' generate(): the new tokens only, [B, max_new_tokens]."""
    extra = {"cache_implementation": "static"} if static_cache else {}
    sampler, amp = model, bf16
    if static_cache and bf16:
        # A static cache is allocated in the weights' dtype and autocast hands it bf16 keys
        # (transformers 5.17 refuses the mix): decode with a bf16 copy of the weights instead.
        # Matmuls see the same bf16 operands as under autocast; norms and the residual stream
        # run in bf16 rather than fp32.
        sampler, amp = _bf16_twin(model), False
    # generate() samples from the global generator: seed it inside fork_rng so that
    # sampling never changes the random state the caller (training) sees afterwards.
    cuda = [device.index if device.index is not None else torch.cuda.current_device()
            ] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), autocast(device, amp):
        torch.manual_seed(cfg.seed)
        gen = sampler.generate(
            input_ids=x, attention_mask=mask, do_sample=True,
            temperature=cfg.temperature, top_k=cfg.top_k or 0, top_p=1.0,
            max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.max_new_tokens,
            pad_token_id=pad, eos_token_id=eos, **extra,
        )
    return gen[:, x.shape[1]:]


# The last bf16 copy and what it was made from: transformers compiles the static-cache decode
# step per model instance, so the copy is refilled rather than remade when it still fits.
_twin: list[tuple[str, nn.Module]] = []


def _twin_key(model: nn.Module) -> str:
    """Everything besides the tensors that decides what the copy computes."""
    cfg = model.config.to_json_string(use_diff=False) if hasattr(model, "config") else ""
    shapes = [(n, tuple(t.shape), t.dtype) for n, t in
              [*model.named_parameters(), *model.named_buffers()]]
    return repr((type(model), cfg, repr(getattr(model, "peft_config", None)), shapes))


def _bf16_twin(model: nn.Module) -> nn.Module:
    """A bf16 copy of `model`'s parameters (buffers keep their dtype), current values."""
    key = _twin_key(model)
    if not _twin or _twin[0][0] != key:
        twin = copy.deepcopy(model).eval()
        for p in twin.parameters():
            p.data = p.data.to(torch.bfloat16)
        _twin[:] = [(key, twin)]
    twin = _twin[0][1]
    with torch.no_grad():
        for (_, t), (_, p) in zip([*twin.named_parameters(), *twin.named_buffers()],
                                  [*model.named_parameters(), *model.named_buffers()],
                                  strict=True):
            t.copy_(p)
    return twin


def release_twin() -> None:
    """Free the bf16 copy (end of a run)."""
    _twin.clear()


def p_stats(samples: Sequence[Sample]) -> dict[str, object]:
    return mean_ci([s.p for s in samples])
