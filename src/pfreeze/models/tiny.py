"""Tiny random-init configurations of every supported family, for `random:<name>` models.

Each is a transformers config class filled with small shapes: 4 blocks, 4 query heads and 2
KV heads where the family has grouped-query attention (so k/v slices differ from q's), and
an explicit head_dim unequal to hidden/heads where the family allows one (so code that
assumes hidden = heads·head_dim fails). Dropout is off so that runs are deterministic.
"""

from __future__ import annotations

from typing import Any

_V, _H, _L, _NH, _KV, _I = 257, 64, 4, 4, 2, 128
_DECODER = dict(vocab_size=_V, hidden_size=_H, intermediate_size=_I, num_hidden_layers=_L,
                num_attention_heads=_NH, num_key_value_heads=_KV, max_position_embeddings=512)
_MOE = dict(_DECODER, num_experts_per_tok=2)
_FALCON = dict(vocab_size=_V, hidden_size=_H, num_hidden_layers=_L, num_attention_heads=_NH,
               ffn_hidden_size=_I, hidden_dropout=0.0, attention_dropout=0.0)

# random:<name> -> (model_type, config arguments)
TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("gpt2", dict(vocab_size=_V, n_embd=_H, n_layer=_L, n_head=_NH, n_positions=512,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "gpt-neo": ("gpt_neo", dict(vocab_size=_V, hidden_size=_H, num_layers=_L, num_heads=_NH,
                                attention_types=[[["global", "local"], _L // 2]],
                                max_position_embeddings=512, window_size=64, resid_dropout=0.0,
                                embed_dropout=0.0, attention_dropout=0.0)),
    "gpt-neox": ("gpt_neox", dict(vocab_size=_V, hidden_size=_H, num_hidden_layers=_L,
                                  num_attention_heads=_NH, intermediate_size=_I,
                                  max_position_embeddings=512, hidden_dropout=0.0,
                                  attention_dropout=0.0)),
    "llama": ("llama", dict(_DECODER, tie_word_embeddings=True)),
    "mistral": ("mistral", _DECODER),
    # Granite's scalar multipliers away from 1, so that code which drops one fails.
    "granite": ("granite", dict(_DECODER, embedding_multiplier=12.0, residual_multiplier=0.22,
                                attention_multiplier=0.1, logits_scaling=8.0)),
    "qwen2": ("qwen2", _DECODER),
    "qwen3": ("qwen3", dict(_DECODER, head_dim=32)),
    "gemma": ("gemma", dict(_DECODER, head_dim=32)),
    "gemma2": ("gemma2", dict(_DECODER, head_dim=32, sliding_window=16)),
    "gemma3": ("gemma3_text", dict(_DECODER, head_dim=32, sliding_window=16)),
    "olmo": ("olmo", _DECODER),
    "olmo2": ("olmo2", _DECODER),
    "stablelm": ("stablelm", dict(_DECODER, use_qkv_bias=True)),
    "phi3": ("phi3", dict(_DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "mixtral": ("mixtral", dict(_MOE, num_local_experts=4)),
    "qwen3-moe": ("qwen3_moe", dict(_MOE, head_dim=32, num_experts=4, moe_intermediate_size=48,
                                    decoder_sparse_step=1, mlp_only_layers=[])),
    "olmoe": ("olmoe", dict(_MOE, num_experts=4)),
    # Biases as in Phi-3.5-MoE's published config (q/k/v/o and the head).
    "phimoe": ("phimoe", dict(_MOE, num_local_experts=4, attention_bias=True,
                              lm_head_bias=True)),
    # Falcon's three attention layouts: grouped (40B/180B), multi-query (7B), multi-head.
    "falcon": ("falcon", dict(_FALCON, new_decoder_architecture=True, num_kv_heads=_KV)),
    "falcon-mq": ("falcon", dict(_FALCON, multi_query=True, new_decoder_architecture=False,
                                 parallel_attn=True)),
    "falcon-mh": ("falcon", dict(_FALCON, multi_query=False, new_decoder_architecture=False,
                                 parallel_attn=False, bias=True)),
    "gptj": ("gptj", dict(vocab_size=_V, n_embd=_H, n_layer=_L, n_head=_NH, n_positions=512,
                          n_inner=_I, rotary_dim=8)),
}
