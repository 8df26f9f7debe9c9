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

ARCHITECTURES is the same registry seen as name -> Arch (block regex and rules only). The
layouts a rule can name (fused q/k/v, gate/up, 3-D experts) live in `models.layouts`; a model
no entry covers may still get a family inferred from its names (`models.infer`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from torch import nn

from pfreeze.models.layouts import (
    ROLES,
    Geometry,
    ParamInfo,
    Rule,
    decoder_rules,
    role_index,
    roles_in,
)

__all__ = ["ARCHITECTURES", "FAMILIES", "ROLES", "Arch", "Family", "Geometry", "ParamInfo",
           "Rule", "Split", "describe_params", "family_for", "first_trained_block",
           "role_index", "roles_in", "sampler_model_types"]

@dataclass(frozen=True)
class Arch:
    block: str  # regex matching the block prefix, group 1 = layer index
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class Split:
    """Where the frozen-prefix cache cuts a *ForCausalLM: the attribute names of its decoder,
    the decoder's block list, its final norm, and its learned position embedding (None for
    rotary families, whose positions are applied inside each block). `input_scale`: a
    decoder attribute that multiplies `inputs_embeds` in its forward (Granite's
    `embedding_multiplier`), set to 1 in the upper view where a model has it, since block
    f's cached input already holds it."""

    decoder: str
    blocks: str
    norm: str
    positions: str | None = None
    input_scale: str | None = None


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


# The decoder most families share: `model.layers.N`, `self_attn.{q,k,v,o}_proj`, a gated MLP
# `mlp.{gate,up,down}_proj`. Norms cover LayerNorm biases and per-head q/k norms (StableLM's
# `q_layernorm.norms.H`); OLMo has no norm parameters at all, which the rules allow.
_DECODER = decoder_rules()
_MLP_REST = (Rule(r".*mlp\..*", "mlp"),)  # anything else in an MLP: roles=mlp trains it too
# transformers stores each layer's experts as two 3-D parameters, (E, 2I, H) and (E, H, I),
# applied as F.linear(x, W[e]): per expert (out, in), the gate half first.
_MOE = (
    Rule(r".*mlp\.(gate|router)\.weight", "router"),
    Rule(r".*mlp\.experts\.gate_up_proj", "gate_up", "gate_up", 1, experts=True),
    Rule(r".*mlp\.experts\.down_proj", "down", experts=True),
)
_MODEL_LAYERS = Split("model", "layers", "norm", input_scale="embedding_multiplier")

_LLAMA_TYPES = ("llama", "mistral", "granite", "qwen2", "qwen3", "gemma", "gemma2",
                "gemma3_text", "olmo", "olmo2", "stablelm")
_MOE_TYPES = ("mixtral", "qwen3_moe", "olmoe", "phimoe")

_FAMILIES = (
    Family("llama", model_types=_LLAMA_TYPES,
           block=r"model\.layers\.(\d+)\.", rules=_DECODER + _MLP_REST, split=_MODEL_LAYERS,
           sampler_model_types=_LLAMA_TYPES),
    # PhiMoE (Phi-3.5-MoE) names its router `mlp.router`, not `mlp.gate`.
    Family("moe", model_types=_MOE_TYPES, block=r"model\.layers\.(\d+)\.",
           rules=_DECODER + _MOE + _MLP_REST, split=_MODEL_LAYERS,
           sampler_model_types=_MOE_TYPES),
    Family(
        "phi3",
        model_types=("phi3",),  # Phi-3, Phi-3.5 and Phi-4 all load as phi3
        block=r"model\.layers\.(\d+)\.",
        rules=(
            *_DECODER[:3],
            Rule(r".*self_attn\.qkv_proj\.weight", "qkv", "qkv_concat", 0),
            *_DECODER[6:8],
            Rule(r".*mlp\.gate_up_proj\.weight", "gate_up", "gate_up", 0),
            *_DECODER[10:],
            *_MLP_REST,
        ),
        split=_MODEL_LAYERS,
        sampler_model_types=("phi3",),
    ),
    Family(
        "falcon",
        model_types=("falcon",),
        block=r"transformer\.h\.(\d+)\.",
        rules=(
            Rule(r"transformer\.word_embeddings\.weight", "embed"),
            Rule(r"lm_head\.weight", "head"),
            Rule(r".*(ln_attn|ln_mlp|ln_f|layernorm)\.(weight|bias)", "norm"),
            # One layout for all three configurations, told apart by the KV head count:
            # grouped (new_decoder_architecture), multi-query (1 group), multi-head (1 per head).
            Rule(r".*self_attention\.query_key_value\.(weight|bias)", "qkv", "qkv_grouped", 0),
            Rule(r".*self_attention\.dense\.weight", "o", "in", 1),
            Rule(r".*self_attention\.dense\.bias", "o"),
            Rule(r".*mlp\.dense_h_to_4h\..*", "up"),
            Rule(r".*mlp\.dense_4h_to_h\..*", "down"),
        ),
        # ALiBi (alibi=True) is built from positions in the decoder: the upper view builds it.
        split=Split("transformer", "h", "ln_f"),
        sampler_model_types=("falcon",),  # not with alibi=True: the sampler checks that
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
            Rule(r".*mlp\.c_fc\..*", "up"),
            Rule(r".*mlp\.c_proj\..*", "down"),
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
            Rule(r".*mlp\.c_fc\..*", "up"),
            Rule(r".*mlp\.c_proj\..*", "down"),
        ),
        # Local layers build their window mask in the block: the split holds. No sampler
        # model_type: its attention classes are its own, so it samples with generate.
        split=Split("transformer", "h", "ln_f", positions="wpe"),
    ),
    Family(
        "gptj",
        model_types=("gptj",),
        block=r"transformer\.h\.(\d+)\.",
        rules=(
            Rule(r"transformer\.wte\.weight", "embed"),
            Rule(r"lm_head\.(weight|bias)", "head"),
            Rule(r".*ln_(1|f)\.(weight|bias)", "norm"),
            Rule(r".*attn\.q_proj\.weight", "q", "out", 0),
            Rule(r".*attn\.k_proj\.weight", "k", "out", 0),
            Rule(r".*attn\.v_proj\.weight", "v", "out", 0),
            Rule(r".*attn\.out_proj\.weight", "o", "in", 1),
            Rule(r".*mlp\.fc_in\..*", "up"),
            Rule(r".*mlp\.fc_out\..*", "down"),
        ),
        split=Split("transformer", "h", "ln_f"),
        sampler_model_types=("gptj",),
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
            Rule(r".*mlp\.dense_h_to_4h\..*", "up"),
            Rule(r".*mlp\.dense_4h_to_h\..*", "down"),
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


def describe_params(model: nn.Module, family: str) -> dict[str, ParamInfo]:
    """Each parameter of `model` by name: its shape, block, role rule and tying."""
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
