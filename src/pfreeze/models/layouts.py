"""Where one role's rows or columns sit inside a tensor: the rule layouts, the attention
geometry, and `role_index`, which turns (tensor, role, heads) into indices along one dim.

Layouts (the `layout` of a `Rule`; `dim` is the dimension they index):

    whole        one role, the whole tensor (heads cannot cut it)
    out, in      one role; its heads are consecutive blocks of head_dim along `dim`
    qkv_blocks   [q | k | v] of equal widths (GPT-2 `c_attn`, a Conv1D: columns)
    qkv_concat   [q: all heads | k: KV heads | v: KV heads] (Phi-3 `qkv_proj`, unequal
                 widths under grouped-query attention)
    qkv_grouped  per KV group [q_0 .. q_{p-1}, k, v], p = heads per group (Falcon
                 `query_key_value`: grouped; multi-query is one group; multi-head one head
                 per group, which is also GPT-NeoX's [head][q, k, v] interleave)
    gate_up      [gate | up] halves (Phi-3 `gate_up_proj`, MoE `experts.gate_up_proj`)

A rule with `experts=True` marks a fused 3-D expert tensor whose dim 0 is the expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ROLES = ("q", "k", "v", "o", "gate", "up", "down", "router", "experts", "mlp", "embed",
         "norm", "head")
# The roles a fused layout holds, in the order the pieces are reported.
FUSED = {"qkv_blocks": ("q", "k", "v"), "qkv_concat": ("q", "k", "v"),
         "qkv_grouped": ("q", "k", "v"), "qkv_heads": ("q", "k", "v"),
         "gate_up": ("gate", "up")}
LAYOUTS = ("whole", "out", "in", *FUSED)


@dataclass(frozen=True)
class Rule:
    """How one family of parameter names maps to roles.

    layout: one of LAYOUTS (see the module docstring); dim: the dimension it indexes.
    experts: dim 0 indexes experts (MoE experts stored as one 3-D parameter).
    """

    pattern: str
    role: str
    layout: str = "whole"
    dim: int = 0
    experts: bool = False

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"rule {self.pattern}: unknown layout '{self.layout}'")


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
        kv = getattr(c, "num_key_value_heads", None) or getattr(c, "num_kv_heads", None) or heads
        if getattr(c, "multi_query", False) and not getattr(c, "new_decoder_architecture", False):
            kv = 1  # multi-query configs keep reporting num_kv_heads = heads, but share one
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


def _rows(offsets: list[int], width: int) -> torch.Tensor:
    return torch.cat([torch.arange(o, o + width) for o in offsets])


def _qkv_offsets(layout: str, role: str, heads: list[int], size: int, g: Geometry
                 ) -> tuple[list[int], int]:
    """(first index of each head's block, head width) of role q, k or v in a fused layout."""
    nh, nkv = g.n_heads, g.n_kv_heads
    r = "qkv".index(role)
    if layout == "qkv_blocks":
        width = size // 3
        hd = width // nh
        return [r * width + h * hd for h in heads], hd
    if layout == "qkv_heads":  # one group per head
        nkv = nh
    hd = size // (nh + 2 * nkv)
    if layout == "qkv_concat":
        base = (0, nh, nh + nkv)[r]
        return [(base + h) * hd for h in heads], hd
    p = nh // nkv  # qkv_grouped: group j holds q heads j·p .. j·p+p-1, then k_j, v_j
    if role == "q":
        return [((h // p) * (p + 2) + h % p) * hd for h in heads], hd
    return [(j * (p + 2) + p + r - 1) * hd for j in heads], hd


def role_index(info: ParamInfo, role: str, heads: list[int] | None,
               g: Geometry) -> torch.Tensor | None:
    """Indices along info.rule.dim that belong to `role` (and `heads`); None = whole tensor."""
    rule, size = info.rule, info.shape[info.rule.dim] if info.shape else 0
    if rule.layout == "whole" or role == "experts":
        return None if heads is None else torch.empty(0, dtype=torch.long)
    if rule.layout in ("out", "in"):
        if heads is None:
            return None
        hd = size // g.heads_of(role)
        return _rows([h * hd for h in heads], hd)
    if rule.layout == "gate_up":
        if heads is not None:
            return torch.empty(0, dtype=torch.long)
        half = size // 2
        return torch.arange(half) + (half if role == "up" else 0)
    hs = heads if heads is not None else list(range(g.heads_of(role)))
    return _rows(*_qkv_offsets(rule.layout, role, hs, size, g))


def rule_roles(rule: Rule) -> tuple[str, ...]:
    """The roles a tensor matched by `rule` holds: each role of a fused layout, and
    `experts` for an expert tensor."""
    return FUSED.get(rule.layout, (rule.role,)) + ("experts",) * rule.experts


def roles_in(info: ParamInfo) -> tuple[str, ...]:
    """The roles a parameter holds: its rule's, and head too for an embedding tied to it."""
    return rule_roles(info.rule) + (("head",) if info.tied else ())


def pieces(info: ParamInfo, g: Geometry) -> list[tuple[str, torch.Tensor | None]]:
    """(role, indices along info.rule.dim) of each role a tensor holds: one piece per role of
    a fused layout, else the whole tensor under its role."""
    if info.rule.layout in FUSED:
        return [(r, role_index(info, r, None, g)) for r in FUSED[info.rule.layout]]
    return [(info.rule.role, None)]


def decoder_rules(attn: str = r"self_attn", out: str = r"o_proj",
                  embed: str = r"model\.embed_tokens") -> tuple[Rule, ...]:
    """The names most decoders share (Llama's): embedding, head, norms (LayerNorm biases and
    per-head q/k norms too), q/k/v/o projections under `attn`, a gated MLP. The patterns are
    regexes; inferred families pass wider ones for `attn`, `out` and `embed`."""
    return (
        Rule(rf"{embed}\.weight", "embed"),
        Rule(r"lm_head\.(weight|bias)", "head"),
        Rule(r".*(norm|layernorm|norms\.\d+)\.(weight|bias)", "norm"),
        Rule(rf".*{attn}\.q_proj\.(weight|bias)", "q", "out", 0),
        Rule(rf".*{attn}\.k_proj\.(weight|bias)", "k", "out", 0),
        Rule(rf".*{attn}\.v_proj\.(weight|bias)", "v", "out", 0),
        Rule(rf".*{attn}\.{out}\.weight", "o", "in", 1),
        Rule(rf".*{attn}\.{out}\.bias", "o"),
        Rule(r".*mlp\.gate_proj\.(weight|bias)", "gate"),
        Rule(r".*mlp\.up_proj\.(weight|bias)", "up"),
        Rule(r".*mlp\.down_proj\.(weight|bias)", "down"),
    )
