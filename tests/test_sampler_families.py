"""pfreeze's sampler serves a model_type only where it decodes, token for token, what
transformers' `generate` decodes greedily on that family's tiny random model."""

from __future__ import annotations

import pytest
import torch

from pfreeze.errors import PfreezeError
from pfreeze.measure.generation import _left_padded
from pfreeze.measure.sampler import check, sample, why_not
from pfreeze.models.families import sampler_model_types
from pfreeze.models.load import load_model

ROWS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23]]  # unequal: left padding
NEW = 16  # 6 + 16 slots pass the tiny Gemma 2/3 sliding window (16): it is exercised

# random:<name> -> model_type: one tiny model per model_type the sampler serves (Falcon's
# three attention layouts each); this table is the proof behind every served model_type.
SERVED = {
    "llama": "llama", "mistral": "mistral", "granite": "granite", "qwen2": "qwen2",
    "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text",
    "olmo": "olmo", "olmo2": "olmo2", "stablelm": "stablelm", "phi3": "phi3",
    "mixtral": "mixtral", "qwen3-moe": "qwen3_moe", "olmoe": "olmoe", "phimoe": "phimoe",
    "falcon": "falcon",
    "falcon-mq": "falcon", "falcon-mh": "falcon", "gptj": "gptj", "gpt2": "gpt2",
    "gpt-neox": "gpt_neox",
}


def vivid(name: str) -> torch.nn.Module:
    """A tiny model whose greedy output depends on its context (default inits repeat one
    token): every matrix and expert tensor N(0, 0.3²) — the embedding divided by Gemma's
    embed scale, else the tied head only echoes the last token — and q/k norms at 3, else
    Gemma 3's normalized queries attend almost uniformly."""
    model = load_model(f"random:{name}", seed=0).model
    emb = model.get_input_embeddings()
    scale = float(getattr(emb, "embed_scale", 1.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 / (scale if p is emb.weight
                                                                    else 1.0))
            elif n.endswith(("q_norm.weight", "k_norm.weight")):
                p.fill_(3.0)
    return model.eval()


def greedy_both(model: torch.nn.Module, new: int = NEW) -> tuple[torch.Tensor, torch.Tensor]:
    """(pfreeze's sampler, generate): greedy ids after the left-padded ROWS. Both keep EOS
    out (the sampler always does; generate with min_new_tokens)."""
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    eos = eos if eos is not None and eos < model.config.vocab_size else None  # tiny vocab
    x, mask = _left_padded(ROWS, 0)
    ours = sample(model, x, (mask == 0).sum(1), new, top_k=1, temperature=1.0, eos=eos,
                  seed=0, bf16=False, graph=False)
    hf = model.generate(input_ids=x, attention_mask=mask, do_sample=False, max_new_tokens=new,
                        min_new_tokens=new, pad_token_id=0)[:, x.shape[1]:]
    return ours, hf


def test_the_served_model_types_are_exactly_those_proven_here() -> None:
    assert set(sampler_model_types()) == set(SERVED.values())


@pytest.mark.parametrize("name", SERVED)
def test_greedy_decoding_equals_generate_for_every_served_family(name: str) -> None:
    model = vivid(name)
    check(model, 1)  # served: no refusal
    ours, hf = greedy_both(model)
    assert torch.equal(ours, hf)
    assert len(set(ours.flatten().tolist())) > 8  # the output depends on the context
    assert ours[0].tolist() != ours[1].tolist()


def test_a_sliding_window_shorter_than_the_sequence_is_decoded_as_generate_does() -> None:
    """Mistral's window (4096 by default) is read from its config at every call: at 6 the
    window cuts every row's context, so decoding without it would differ."""
    model = vivid("mistral")
    full, _ = greedy_both(model)
    model.config.sliding_window = 6
    ours, hf = greedy_both(model)
    assert torch.equal(ours, hf)
    assert not torch.equal(ours, full)  # the window changed what is decoded


def test_gemma2_softcapping_is_applied_to_attention_logits() -> None:
    model = vivid("gemma2")
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = 0.5  # strong: binds every logit
    ours, hf = greedy_both(model)
    assert torch.equal(ours, hf)
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    assert not torch.equal(greedy_both(model)[0], ours)


def test_families_the_sampler_cannot_reproduce_fall_back_to_generate_with_the_reason() -> None:
    gpu = torch.device("cuda")  # only its type is read
    neo = load_model("random:gpt-neo", seed=0).model  # own attention classes, no interface
    assert "(this one: gpt_neo)" in why_not(neo, 50, gpu)
    alibi = load_model("random:falcon-mh", seed=0).model
    alibi.config.alibi = True  # ALiBi reaches attention through the mask the sampler skips
    assert why_not(alibi, 50, gpu) == "pfreeze's sampler does not apply ALiBi position biases"
    with pytest.raises(PfreezeError, match="ALiBi"):
        check(alibi, 50)
