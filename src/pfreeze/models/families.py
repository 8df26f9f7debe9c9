"""How each supported model family names and lays out its weights: which role (q, k, v, o,
mlp, embed, norm, head) a parameter plays, which block it belongs to, the attention heads'
geometry, and where one role's rows or columns sit inside a tensor, fused ones included
(GPT-2 `c_attn` column blocks, GPT-NeoX `query_key_value` per-head interleaving).

A new family is one entry in ARCHITECTURES plus its `model_type` in `models.family_of`; plan,
masking, rank and flops need nothing more. The frozen-prefix cache (`prefix.SPLITS`) and
pfreeze's sampler (`sampler.MODEL_TYPES`) have tables of their own: a family not listed there
trains uncached and samples with transformers' `generate`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

ROLES = ("q", "k", "v", "o", "mlp", "embed", "norm", "head")


@dataclass(frozen=True)
class Rule:
    """How one family of parameter names maps to roles.

    layout: "whole" (one role, whole tensor), "out"/"in" (one role; heads index that dim),
    "qkv_blocks" (GPT-2: [q|k|v] blocks along `dim`), "qkv_heads" (NeoX: [head][q,k,v][hd]).
    """

    pattern: str
    role: str
    layout: str = "whole"
    dim: int = 0


@dataclass(frozen=True)
class Arch:
    block: str  # regex matching the block prefix, group 1 = layer index
    rules: tuple[Rule, ...]


ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch(r"model\.layers\.(\d+)\.", (
        Rule(r"model\.embed_tokens\.weight", "embed"),
        Rule(r"lm_head\.weight", "head"),
        Rule(r".*norm\.weight", "norm"),
        Rule(r".*self_attn\.q_proj\.(weight|bias)", "q", "out", 0),
        Rule(r".*self_attn\.k_proj\.(weight|bias)", "k", "out", 0),
        Rule(r".*self_attn\.v_proj\.(weight|bias)", "v", "out", 0),
        Rule(r".*self_attn\.o_proj\.weight", "o", "in", 1),
        Rule(r".*self_attn\.o_proj\.bias", "o"),
        Rule(r".*mlp\..*", "mlp"),
    )),
    "gpt2": Arch(r"transformer\.h\.(\d+)\.", (
        Rule(r"transformer\.(wte|wpe)\.weight", "embed"),
        Rule(r"lm_head\.weight", "head"),
        Rule(r".*ln_(1|2|f)\.(weight|bias)", "norm"),
        # Conv1D stores (in, out): q, k, v are column blocks of the weight, slices of the bias.
        Rule(r".*attn\.c_attn\.weight", "qkv", "qkv_blocks", 1),
        Rule(r".*attn\.c_attn\.bias", "qkv", "qkv_blocks", 0),
        Rule(r".*attn\.c_proj\.weight", "o", "in", 0),
        Rule(r".*attn\.c_proj\.bias", "o"),
        Rule(r".*mlp\..*", "mlp"),
    )),
    "gpt-neo": Arch(r"transformer\.h\.(\d+)\.", (
        Rule(r"transformer\.(wte|wpe)\.weight", "embed"),
        Rule(r"lm_head\.weight", "head"),
        Rule(r".*ln_(1|2|f)\.(weight|bias)", "norm"),
        Rule(r".*attention\.q_proj\.weight", "q", "out", 0),
        Rule(r".*attention\.k_proj\.weight", "k", "out", 0),
        Rule(r".*attention\.v_proj\.weight", "v", "out", 0),
        Rule(r".*attention\.out_proj\.weight", "o", "in", 1),
        Rule(r".*attention\.out_proj\.bias", "o"),
        Rule(r".*mlp\..*", "mlp"),
    )),
    "gpt-neox": Arch(r"gpt_neox\.layers\.(\d+)\.", (
        Rule(r"gpt_neox\.embed_in\.weight", "embed"),
        Rule(r"(embed_out|lm_head)\.weight", "head"),
        Rule(r".*(layernorm|layer_norm)\.(weight|bias)", "norm"),
        # Linear rows are laid out per head as [head][q, k, v][head_dim].
        Rule(r".*attention\.query_key_value\.(weight|bias)", "qkv", "qkv_heads", 0),
        Rule(r".*attention\.dense\.weight", "o", "in", 1),
        Rule(r".*attention\.dense\.bias", "o"),
        Rule(r".*mlp\..*", "mlp"),
    )),
}


@dataclass
class Geometry:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, model: nn.Module) -> Geometry:
        c = model.config
        heads = c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or heads
        hd = getattr(c, "head_dim", None) or c.hidden_size // heads
        return cls(c.num_hidden_layers, heads, kv, hd)

    def heads_of(self, role: str) -> int:
        return self.n_kv_heads if role in ("k", "v") else self.n_heads


@dataclass
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    layer: int | None
    rule: Rule
    tied: str | None = None  # name of the parameter that shares this storage


def describe_params(model: nn.Module, family: str) -> dict[str, ParamInfo]:
    arch = ARCHITECTURES[family]
    out: dict[str, ParamInfo] = {}
    for name, p in model.named_parameters():
        m = re.match(arch.block, name)
        layer = int(m.group(1)) if m else None
        rule = next((r for r in arch.rules if re.fullmatch(r.pattern, name)), Rule(".*", "other"))
        out[name] = ParamInfo(name, tuple(p.shape), layer, rule)
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight:
        # named_parameters() lists a tied weight once, under the input embedding's name.
        emb = next(n for n, p in model.named_parameters() if p is in_emb.weight)
        out[emb].tied = "lm_head"
    return out


def role_index(info: ParamInfo, role: str, heads: list[int] | None,
               g: Geometry) -> torch.Tensor | None:
    """Indices along info.rule.dim that belong to `role` (and `heads`); None = whole tensor."""
    rule, size = info.rule, info.shape[info.rule.dim] if info.shape else 0
    if rule.layout == "whole":
        return None if heads is None else torch.empty(0, dtype=torch.long)
    if rule.layout in ("out", "in"):
        if heads is None:
            return None
        hd = size // g.heads_of(role)
        return torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])
    hs = heads if heads is not None else list(range(g.n_heads))
    r = "qkv".index(role)
    if rule.layout == "qkv_blocks":
        width = size // 3
        hd = width // g.n_heads
        return torch.cat([torch.arange(r * width + h * hd, r * width + (h + 1) * hd) for h in hs])
    hd = size // (3 * g.n_heads)  # qkv_heads
    return torch.cat([torch.arange(h * 3 * hd + r * hd, h * 3 * hd + (r + 1) * hd) for h in hs])


def roles_in(info: ParamInfo) -> tuple[str, ...]:
    """The roles a parameter holds: q, k, v for a fused matrix, embed and head when tied."""
    if info.rule.role == "qkv":
        return ("q", "k", "v")
    if info.tied:
        return (info.rule.role, "head")
    return (info.rule.role,)


def first_trained_block(trained: set[str], infos: dict[str, ParamInfo], n_layers: int) -> int:
    """Lowest block index with a trained tensor; 0 if the embedding trains, L if only the top."""
    f = n_layers
    for name in trained:
        info = infos[name]
        if info.layer is not None:
            f = min(f, info.layer)
        elif info.rule.role == "embed" or info.tied:
            return 0  # the embedding (or a head tied to it) changes block 0's input
    return f
