r"""How each supported model family names and lays out its weights: which role (q, k, v, o,
mlp, embed, norm, head) a parameter plays, which block it belongs to, the attention heads'
geometry, and where one role's rows or columns sit inside a tensor, fused ones included
(GPT-2 `c_attn` column blocks, GPT-NeoX `query_key_value` per-head interleaving).

A model family is one `Family` entry in `_FAMILIES` below (FAMILIES, the registry, keys it
by name), and every table reads it from there: `models.family_of` (the transformers
`model_type`s it covers), plan, masking, rank and flops (its block regex and role rules),
the frozen-prefix cache (its `split`; None trains uncached) and pfreeze's sampler (its
`sampler_model_types`; others sample with transformers' `generate`). For example, a
Llama-shaped family whose attention projections are named `wq`, `wk`, `wv`, `wo`:

    Family("mylm", model_types=("mylm",), block=r"model\.layers\.(\d+)\.",
           rules=(Rule(r"model\.embed_tokens\.weight", "embed"),
                  Rule(r"lm_head\.weight", "head"),
                  Rule(r".*norm\.weight", "norm"),
                  Rule(r".*attn\.wq\.weight", "q", "out", 0),
                  Rule(r".*attn\.wk\.weight", "k", "out", 0),
                  Rule(r".*attn\.wv\.weight", "v", "out", 0),
                  Rule(r".*attn\.wo\.weight", "o", "in", 1),
                  Rule(r".*mlp\..*", "mlp")),
           split=Split("model", "layers", "norm"), sampler_model_types=("mylm",))

ARCHITECTURES is the same registry seen as name -> Arch (block regex and rules only).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
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


@dataclass(frozen=True)
class Split:
    """Where the frozen-prefix cache cuts a *ForCausalLM: the attribute names of its decoder,
    the decoder's block list, its final norm, and its learned position embedding (None for
    rotary families, whose positions are applied inside each block)."""

    decoder: str
    blocks: str
    norm: str
    positions: str | None = None


@dataclass(frozen=True)
class Family:
    """Everything pfreeze knows about one model family; every table reads it from here.

    model_types: the transformers `config.model_type`s the family covers.
    block, rules: as in Arch (block prefix regex, parameter name -> role and layout).
    split: how the frozen-prefix cache cuts the model; None trains uncached.
    sampler_model_types: the model_types pfreeze's sampler serves (its decode attention needs
    AttentionInterface and `layer_idx`, checked per model_type, not per family); the rest
    sample with transformers' `generate`.
    """

    name: str
    model_types: tuple[str, ...]
    block: str
    rules: tuple[Rule, ...]
    split: Split | None = None
    sampler_model_types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        extra = set(self.sampler_model_types) - set(self.model_types)
        if extra:
            raise ValueError(f"family {self.name}: sampler_model_types {sorted(extra)} "
                             "are not among its model_types")

    @property
    def arch(self) -> Arch:
        return Arch(self.block, self.rules)


_FAMILIES = (
    Family(
        "llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo",
                     "olmo2"),
        block=r"model\.layers\.(\d+)\.",
        rules=(
            Rule(r"model\.embed_tokens\.weight", "embed"),
            Rule(r"lm_head\.weight", "head"),
            Rule(r".*norm\.weight", "norm"),
            Rule(r".*self_attn\.q_proj\.(weight|bias)", "q", "out", 0),
            Rule(r".*self_attn\.k_proj\.(weight|bias)", "k", "out", 0),
            Rule(r".*self_attn\.v_proj\.(weight|bias)", "v", "out", 0),
            Rule(r".*self_attn\.o_proj\.weight", "o", "in", 1),
            Rule(r".*self_attn\.o_proj\.bias", "o"),
            Rule(r".*mlp\..*", "mlp"),
        ),
        split=Split("model", "layers", "norm"),
        sampler_model_types=("llama",),
    ),
    Family(
        "gpt2",
        model_types=("gpt2",),
        block=r"transformer\.h\.(\d+)\.",
        rules=(
            Rule(r"transformer\.(wte|wpe)\.weight", "embed"),
            Rule(r"lm_head\.weight", "head"),
            Rule(r".*ln_(1|2|f)\.(weight|bias)", "norm"),
            # Conv1D stores (in, out): q, k, v are column blocks of the weight, slices of the
            # bias.
            Rule(r".*attn\.c_attn\.weight", "qkv", "qkv_blocks", 1),
            Rule(r".*attn\.c_attn\.bias", "qkv", "qkv_blocks", 0),
            Rule(r".*attn\.c_proj\.weight", "o", "in", 0),
            Rule(r".*attn\.c_proj\.bias", "o"),
            Rule(r".*mlp\..*", "mlp"),
        ),
        split=Split("transformer", "h", "ln_f", positions="wpe"),
        sampler_model_types=("gpt2",),
    ),
    Family(
        "gpt-neo",
        model_types=("gpt_neo",),
        block=r"transformer\.h\.(\d+)\.",
        rules=(
            Rule(r"transformer\.(wte|wpe)\.weight", "embed"),
            Rule(r"lm_head\.weight", "head"),
            Rule(r".*ln_(1|2|f)\.(weight|bias)", "norm"),
            Rule(r".*attention\.q_proj\.weight", "q", "out", 0),
            Rule(r".*attention\.k_proj\.weight", "k", "out", 0),
            Rule(r".*attention\.v_proj\.weight", "v", "out", 0),
            Rule(r".*attention\.out_proj\.weight", "o", "in", 1),
            Rule(r".*attention\.out_proj\.bias", "o"),
            Rule(r".*mlp\..*", "mlp"),
        ),
        # No split and no sampler model_type: it trains uncached and samples with generate.
    ),
    Family(
        "gpt-neox",
        model_types=("gpt_neox",),
        block=r"gpt_neox\.layers\.(\d+)\.",
        rules=(
            Rule(r"gpt_neox\.embed_in\.weight", "embed"),
            Rule(r"(embed_out|lm_head)\.weight", "head"),
            Rule(r".*(layernorm|layer_norm)\.(weight|bias)", "norm"),
            # Linear rows are laid out per head as [head][q, k, v][head_dim].
            Rule(r".*attention\.query_key_value\.(weight|bias)", "qkv", "qkv_heads", 0),
            Rule(r".*attention\.dense\.weight", "o", "in", 1),
            Rule(r".*attention\.dense\.bias", "o"),
            Rule(r".*mlp\..*", "mlp"),
        ),
        split=Split("gpt_neox", "layers", "final_layer_norm"),
        sampler_model_types=("gpt_neox",),
    ),
)

# The one registry: family name -> Family. Its order is the order messages list families in.
FAMILIES: dict[str, Family] = {f.name: f for f in _FAMILIES}


def family_for(model_type: str | None) -> Family | None:
    """The registered family that covers `model_type`, or None."""
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)


def sampler_model_types() -> tuple[str, ...]:
    """Every model_type pfreeze's sampler serves, in registry order."""
    return tuple(t for f in FAMILIES.values() for t in f.sampler_model_types)


class _ArchitectureView(Mapping[str, Arch]):
    """FAMILIES seen as name -> Arch, read live so that it never disagrees with the registry."""

    def __getitem__(self, name: str) -> Arch:
        return FAMILIES[name].arch

    def __iter__(self) -> Iterator[str]:
        return iter(FAMILIES)

    def __len__(self) -> int:
        return len(FAMILIES)


ARCHITECTURES: Mapping[str, Arch] = _ArchitectureView()


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
    fam = FAMILIES[family]
    out: dict[str, ParamInfo] = {}
    for name, p in model.named_parameters():
        m = re.match(fam.block, name)
        layer = int(m.group(1)) if m else None
        rule = next((r for r in fam.rules if re.fullmatch(r.pattern, name)), Rule(".*", "other"))
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
