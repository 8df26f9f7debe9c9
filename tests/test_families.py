"""The family registry: one entry per family, read by every table (roles, prefix split,
sampler), so that a new family needs that one entry and nothing else."""

from __future__ import annotations

import collections
from dataclasses import replace

import pytest
import torch
from torch import nn

from pfreeze.errors import PfreezeError
from pfreeze.measure.sampler import check
from pfreeze.models.families import (
    ARCHITECTURES,
    FAMILIES,
    Family,
    describe_params,
    family_for,
    sampler_model_types,
)
from pfreeze.models.load import family_of, load_model
from pfreeze.run.prefix import Caches

CPU = torch.device("cpu")
RANDOM = ("gpt2", "gpt-neo", "gpt-neox", "llama")  # the families with a tiny random: model


def test_every_model_type_belongs_to_exactly_one_family() -> None:
    owners = collections.Counter(t for f in FAMILIES.values() for t in f.model_types)
    assert [t for t, n in owners.items() if n > 1] == []
    for name, fam in FAMILIES.items():
        assert fam.name == name
        for t in fam.model_types:
            assert family_for(t) is fam
    assert family_for("t5") is None


def test_the_registry_keeps_the_supported_model_types() -> None:
    # Widening the sampler to a model_type is a decision (and a test) of its own: each is
    # proven in test_sampler_families.py. GPT-Neo has attention classes of its own.
    assert sampler_model_types() == (
        "llama", "mistral", "granite", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
        "olmo", "olmo2", "stablelm", "mixtral", "qwen3_moe", "olmoe", "phimoe", "phi3", "falcon",
        "gpt2", "gptj", "gpt_neox")
    assert FAMILIES["llama"].model_types == (
        "llama", "mistral", "granite", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo",
        "olmo2", "stablelm")
    assert FAMILIES["phi3"].model_types == ("phi3",)  # fused qkv_proj: not the llama rules
    assert ARCHITECTURES["gpt2"] == FAMILIES["gpt2"].arch
    assert list(ARCHITECTURES) == list(FAMILIES)


def test_sampler_model_types_must_be_the_familys_own() -> None:
    with pytest.raises(ValueError, match="not among its model_types"):
        replace(FAMILIES["llama"], sampler_model_types=("gpt2",))


@pytest.mark.parametrize("name", RANDOM)
def test_rules_give_every_parameter_of_a_tiny_model_a_role(name: str) -> None:
    lm = load_model(f"random:{name}", seed=0)
    assert lm.family == name
    infos = describe_params(lm.model, lm.family)
    assert len(infos) == len(dict(lm.model.named_parameters()))
    assert [n for n, i in infos.items() if i.rule.role == "other"] == []
    layers = {i.layer for i in infos.values() if i.layer is not None}
    assert layers == set(range(lm.model.config.num_hidden_layers))


@pytest.mark.parametrize("name", RANDOM)
def test_the_prefix_split_names_attributes_the_model_has(name: str) -> None:
    model = load_model(f"random:{name}", seed=0).model
    split = FAMILIES[name].split
    if split is None:
        return
    decoder = getattr(model, split.decoder)
    blocks = getattr(decoder, split.blocks)
    assert isinstance(blocks, nn.ModuleList)
    assert len(blocks) == model.config.num_hidden_layers
    assert isinstance(getattr(decoder, split.norm), nn.Module)
    if split.positions is not None:
        assert isinstance(getattr(decoder, split.positions), nn.Embedding)


def _upper_attention(infos: dict) -> set[str]:
    return {n for n, i in infos.items() if i.layer is not None and i.layer >= 2
            and i.rule.role in ("q", "k", "v")}


def test_a_family_added_as_one_entry_is_served_everywhere(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model("random:llama", seed=0).model
    model.config.model_type = "toy_llama"  # a model_type no shipped family covers
    gpt2 = load_model("random:gpt2", seed=0).model
    gpt2.config.model_type = "toy_gpt2"  # and names no rule can be inferred from
    with pytest.raises(PfreezeError, match="add an entry to pfreeze.models.families.FAMILIES"):
        family_of(gpt2)
    with pytest.raises(PfreezeError, match="this one: toy_llama"):
        check(model, 50)

    toy = replace(FAMILIES["llama"], name="toy", model_types=("toy_llama",),
                  sampler_model_types=("toy_llama",))
    monkeypatch.setitem(FAMILIES, "toy", toy)  # the one entry

    assert family_of(model) == "toy"
    assert ARCHITECTURES["toy"] == toy.arch
    infos = describe_params(model, "toy")
    llama = describe_params(model, "llama")
    assert {n: (i.layer, i.rule) for n, i in infos.items()} == {
        n: (i.layer, i.rule) for n, i in llama.items()}
    cache, why = Caches(4, 16, CPU).for_arm(model, "toy", _upper_attention(infos), infos, True)
    assert cache is not None and why == "blocks 0-1 cached"
    x = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(1))
    windows = torch.tensor([0, 1])
    h = cache.inputs(x, windows, windows)
    assert h.shape == (2, 16, model.config.hidden_size)
    check(model, 50)  # the sampler serves it: no error

    # The same entry without a split or a sampler model_type: uncached, sampled by generate.
    monkeypatch.setitem(FAMILIES, "toy", replace(toy, split=None, sampler_model_types=()))
    cache, why = Caches(4, 16, CPU).for_arm(model, "toy", _upper_attention(infos), infos, True)
    assert cache is None and why.startswith("not for the toy architecture")
    with pytest.raises(PfreezeError, match="this one: toy_llama"):
        check(model, 50)


def test_families_are_frozen() -> None:
    fam: Family = FAMILIES["gpt2"]
    with pytest.raises(AttributeError):
        fam.name = "other"  # type: ignore[misc]


def test_a_module_without_a_config_gets_the_one_line_error() -> None:
    from torch import nn

    from pfreeze.errors import PfreezeError
    from pfreeze.models.load import family_of

    with pytest.raises(PfreezeError, match="architecture 'None' is not supported"):
        family_of(nn.Linear(2, 2))
