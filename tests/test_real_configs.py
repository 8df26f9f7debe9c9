"""Published configurations (values typed in from each model's config.json) built on the meta
device: pfreeze sees the published parameter count, and `layers=50%: roles=q,k,v` trains
exactly the hand-computed count of the upper blocks' Q, K and V."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from pfreeze.models.load import family_of
from pfreeze.plan.selectors import compile_plan

# name -> (model_type, config.json values, total parameters (tied counted once), trainable)
REAL: dict[str, tuple[str, dict[str, Any], int, int]] = {
    "Llama-3.2-1B": ("llama", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
        1_235_814_400, 8 * (2048 * 2048 + 2 * 512 * 2048)),
    # q, k and v have biases; 2 KV heads of 64.
    "Qwen2.5-0.5B": ("qwen2", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
        494_032_768, 12 * (896 * 896 + 896 + 2 * (128 * 896 + 128))),
    # 26 blocks: 50% of them is 13; head_dim 256 with 4 q heads and 1 KV head.
    "Gemma-3-1B": ("gemma3_text", dict(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, tie_word_embeddings=True,
        sliding_window=512),
        999_885_952, 13 * (1024 * 1152 + 2 * 256 * 1152)),
    # The fused qkv_proj: (32 + 2·32)·96 rows of 3072.
    "Phi-3.5-mini": ("phi3", dict(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False,
        pad_token_id=32000),
        3_821_079_552, 16 * (3 * 3072 * 3072)),
    # Multi-query: query_key_value is (4544 + 2·64) × 4544.
    "Falcon-7B": ("falcon", dict(
        vocab_size=65024, hidden_size=4544, num_hidden_layers=32, num_attention_heads=71,
        multi_query=True, new_decoder_architecture=False, parallel_attn=True, bias=False,
        alibi=False),
        6_921_720_704, 16 * (4672 * 4544)),
    "Mixtral-8x7B": ("mixtral", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
        num_experts_per_tok=2, tie_word_embeddings=False),
        46_702_792_704, 16 * (4096 * 4096 + 2 * 1024 * 4096)),
    "OLMoE-1B-7B": ("olmoe", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        tie_word_embeddings=False, pad_token_id=1, eos_token_id=50279),
        6_919_161_856, 8 * (3 * 2048 * 2048)),
    # Published: 41.9B total, 6.6B active (6,640,999,744 here: two of 16 experts). q, k, v
    # (and o, and the head) have biases; 8 KV heads of 128.
    "Phi-3.5-MoE": ("phimoe", dict(
        vocab_size=32064, hidden_size=4096, intermediate_size=6400, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=16,
        num_experts_per_tok=2, attention_bias=True, lm_head_bias=True,
        tie_word_embeddings=False, input_jitter_noise=0.01, router_jitter_noise=0.01),
        41_873_153_344, 16 * (4096 * 4096 + 4096 + 2 * (1024 * 4096 + 1024))),
}


@pytest.mark.parametrize("name", list(REAL))
def test_published_configs(name: str) -> None:
    model_type, values, total, trainable = REAL[name]
    cfg = AutoConfig.for_model(model_type, **values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) == total
    plan = compile_plan(model, family_of(model), "layers=50%: roles=q,k,v")
    assert plan.total == total
    assert plan.trainable == trainable
