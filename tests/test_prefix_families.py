"""The frozen-prefix cache in every family: training blocks 1.. from block 1's cached input
gives the losses and the updated weights of training the whole model (AdamW, weight decay)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from pfreeze.models.families import FAMILIES, describe_params
from pfreeze.models.load import RANDOM_FAMILIES, REAL_SHAPES, _random_config, family_of
from pfreeze.run.prefix import Caches

CPU = torch.device("cpu")
T = 32  # longer than the windows below: a wrong mask per block changes the loss
# Configurations the tiny models do not have by default, where the split needs care: blocks
# that mix attention types (their mask and rotary table follow layer_types), a short local
# window (GPT-Neo builds it in the block).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "gemma3-mixed": ("gemma3", {"layer_types": ["sliding_attention", "full_attention"] * 2,
                                "sliding_window": 8}),
    "qwen2-sliding": ("qwen2", {"use_sliding_window": True, "sliding_window": 8,
                                "max_window_layers": 1, "layer_types": None}),
    "gpt-neo-window": ("gpt-neo", {"window_size": 8}),
    "falcon-alibi": ("falcon-mh", {"alibi": True}),
}
# Training forwards that are random: no cache (block f's input would be one draw of many).
RANDOM = {"phimoe": "PhiMoE samples its experts at random in training",
          "mixtral-jitter": "the model has noise (router_jitter_noise=0.1)"}
VARIANTS["mixtral-jitter"] = ("mixtral", {"router_jitter_noise": 0.1})
CASES = [n for n in RANDOM_FAMILIES if n not in (*REAL_SHAPES, *RANDOM)]
CASES += [n for n in VARIANTS if n not in RANDOM]


def tiny(case: str) -> tuple[torch.nn.Module, str]:
    """random:<case> (or a variant), every matrix N(0, 0.2²): attention far from uniform."""
    name, changes = VARIANTS.get(case, (case, {}))
    cfg = _random_config(name)
    if changes:
        cfg = type(cfg)(**{**cfg.to_dict(), **changes})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model, family_of(model)


def test_every_family_declares_a_split() -> None:
    assert [n for n, f in FAMILIES.items() if f.split is None] == []


@pytest.mark.parametrize("case", CASES)
def test_training_from_the_cached_prefix_equals_training_the_whole_model(case: str) -> None:
    plain, family = tiny(case)
    cached = copy.deepcopy(plain)
    infos = describe_params(plain, family)
    trained = {n for n, i in infos.items() if i.layer is not None and i.layer >= 1}
    cache, why = Caches(4, T, CPU).for_arm(cached, family, trained, infos, True)
    assert cache is not None and why == "blocks 0-0 cached"

    def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
        params = [p for n, p in model.named_parameters() if n in trained]
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)

    opt_plain, opt_cached = adamw(plain), adamw(cached)
    x = torch.randint(0, 250, (2, 2, T), generator=torch.Generator().manual_seed(2))
    for step in range(4):  # two batches of two windows: misses, then hits
        ids, w = x[step % 2], torch.arange(2) + 2 * (step % 2)
        loss = plain(input_ids=ids, labels=ids).loss
        h = cache.inputs(ids, w, w)
        up = cache.upper(inputs_embeds=h, labels=ids, use_cache=False).loss
        assert up.item() == pytest.approx(loss.item(), rel=1e-5), step
        for opt, value in ((opt_plain, loss), (opt_cached, up)):
            opt.zero_grad()
            value.backward()
            opt.step()
    assert (cache.misses, cache.hits) == (4, 4)
    for (n, a), b in zip(plain.named_parameters(), cached.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), n


@pytest.mark.parametrize("case", RANDOM)
def test_a_model_whose_training_forward_is_random_is_not_cached(case: str) -> None:
    model, family = tiny(case)
    infos = describe_params(model, family)
    trained = {n for n, i in infos.items() if i.layer is not None and i.layer >= 1}
    cache, why = Caches(4, T, CPU).for_arm(model, family, trained, infos, True)
    assert cache is None and why.startswith(RANDOM[case])
    x = torch.randint(0, 250, (1, T), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    first = model.model(input_ids=x).last_hidden_state
    assert not torch.equal(first, model.model(input_ids=x).last_hidden_state)  # random indeed
