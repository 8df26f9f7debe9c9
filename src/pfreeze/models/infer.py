"""A family for a model no entry covers, inferred from the common naming conventions.

Most decoders on the hub name their weights like Llama: `<decoder>.layers.N.(self_attn|
attention).{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`, `embed_tokens`, `lm_head`, `*norm`.
A model whose every parameter follows them gets an inferred `Family` with those rules (no
prefix split, no sampler: it trains uncached and samples with `generate`, which need no
knowledge of its forward); one with a parameter they do not explain gets None, so that the
caller can say the model is not understood rather than plan over guessed roles.
"""

from __future__ import annotations

import re

from torch import nn

from pfreeze.models.families import Family
from pfreeze.models.layouts import decoder_rules

_ATTN = r"(self_attn|attention|attn)"
_RULES = decoder_rules(attn=_ATTN, out=r"(o_proj|out_proj)", embed=r".*embed_tokens")


def infer_family(model: nn.Module) -> Family | None:
    """An inferred Family for `model`, or None when its names do not follow the conventions."""
    if not isinstance(model, nn.Module):
        return None
    names = [n for n, _ in model.named_parameters()]
    decoders = {m.group(1) for n in names if (m := re.match(r"(.*\.layers)\.\d+\.", n))}
    if len(decoders) != 1:
        return None
    block = re.escape(decoders.pop()) + r"\.(\d+)\."
    for role in ("q", "k", "v"):
        if not any(re.fullmatch(block + rf"{_ATTN}\.{role}_proj\.weight", n) for n in names):
            return None
    if not all(any(re.fullmatch(r.pattern, n) for r in _RULES) for n in names):
        return None  # a tensor the conventions do not explain: no guessing its role
    mtype = getattr(getattr(model, "config", None), "model_type", None) or "unknown"
    return Family(f"inferred:{mtype}", model_types=(mtype,), block=block, rules=_RULES)


def describe_rules(family: Family) -> list[str]:
    """The rules of a family in words: 'regex -> role (layout, dim)'."""
    return [f"{r.pattern} -> {r.role}" + (f" ({r.layout}, dim {r.dim})"
                                          if r.layout != "whole" else "")
            for r in family.rules]
