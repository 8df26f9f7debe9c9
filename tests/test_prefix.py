"""The frozen-prefix cache: epochs sampling, who may cache, and cached == uncached training."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pfreeze.config import load_config
from pfreeze.data.corpus import BatchStream
from pfreeze.errors import PfreezeError
from pfreeze.models.families import describe_params
from pfreeze.models.load import load_model
from pfreeze.outputs.report import render_report
from pfreeze.run.loop import Loop
from pfreeze.run.prefix import Caches
from pfreeze.run.session import run

CPU = torch.device("cpu")


def test_epochs_stream_gives_every_chunk_once_per_epoch_and_resumes_from_a_count() -> None:
    ids = list(range(100))  # 10 chunks of 10 tokens
    s = BatchStream(ids, 10, 3, seed=5, sampling="epochs")
    batches, wins = [], []
    for _ in range(10):  # 30 windows: exactly three epochs
        batches.append(s.next())
        wins.append(s.windows.clone())
    order = torch.cat(wins)
    for e in range(3):
        assert sorted(order[10 * e : 10 * e + 10].tolist()) == list(range(10))
    assert order[:10].tolist() != order[10:20].tolist()  # reshuffled each epoch
    for x, w in zip(batches, wins, strict=True):  # a window is its aligned chunk
        assert torch.equal(x, w[:, None] * 10 + torch.arange(10))
    again = BatchStream(ids, 10, 3, seed=5, sampling="epochs")
    again.drawn = 12  # what a checkpoint restores (steps x batch)
    assert torch.equal(again.next(), batches[4])


def _trained(model_name: str, select: str, **config: float) -> tuple:
    lm = load_model(model_name, seed=0)
    for k, v in config.items():
        setattr(lm.model.config, k, v)
    infos = describe_params(lm.model, lm.family)
    return lm, infos, set(lm.model.state_dict()) if select == "all" else {
        n for n, i in infos.items() if i.layer is not None and i.layer >= 2
        and i.rule.role in ("q", "k", "v", "qkv")}


# A family without a split: test_families.py::test_a_family_added_as_one_entry_is_served_
# everywhere (every shipped family has one).
@pytest.mark.parametrize("case, reason", [
    ("gpt2-dropout", "dropout (resid_pdrop=0.1)"),
    ("dropout", "dropout (attention_dropout=0.1)"),
    ("embed", "trains block 0 or the embedding"),
    ("phases", "trainable set changes"),
])
def test_arms_that_cannot_cache_say_why(case: str, reason: str) -> None:
    name = {"gpt2-dropout": "random:gpt2"}.get(case, "random:llama")
    extra = ({"attention_dropout": 0.1} if case == "dropout" else
             {"resid_pdrop": 0.1} if case == "gpt2-dropout" else {})
    lm, infos, trained = _trained(name, "all" if case == "embed" else "upper", **extra)
    trained &= set(infos)
    cache, why = Caches(8, 16, CPU).for_arm(lm.model, lm.family, trained, infos,
                                            case != "phases")
    assert cache is None and reason in why


@pytest.mark.parametrize("bound", [False, True], ids=["class-forward", "instance-forward"])
def test_cached_upper_blocks_give_the_full_models_loss_and_gradients(bound: bool) -> None:
    for name in ("random:llama", "random:gpt-neox", "random:gpt2"):
        lm, infos, trained = _trained(name, "upper")
        if bound:  # as kernel libraries (Liger) bind a fused-loss forward to the instance
            lm.model.forward = types.MethodType(type(lm.model).forward, lm.model)
        cache, why = Caches(4, 16, CPU).for_arm(lm.model, lm.family, trained, infos, True)
        assert cache is not None and why == "blocks 0-1 cached"
        x = torch.randint(0, 250, (4, 16), generator=torch.Generator().manual_seed(1))
        params = [p for n, p in lm.model.named_parameters() if n in trained]
        full = lm.model(input_ids=x, labels=x).loss
        g_full = torch.autograd.grad(full, params)
        for _ in range(2):  # a miss (computes block 2's input), then a hit (reads it back)
            h = cache.inputs(x, torch.arange(4), torch.arange(4))
            up = cache.upper(inputs_embeds=h, labels=x, use_cache=False).loss
            assert torch.allclose(up, full, rtol=0, atol=1e-6), name
            for a, b in zip(torch.autograd.grad(up, params), g_full, strict=True):
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name
        assert (cache.misses, cache.hits) == (4, 4)


def _epochs_run(corpus: Path, out: Path, cache: str, accumulation: int = 1) -> dict:
    cfg = load_config(None, [
        f"training.gradient_accumulation_steps={accumulation}",
        f"data.corpus={corpus}", "model.name=random:llama", "data.block_size=32",
        "data.sampling=epochs", f"training.prefix_cache={cache}", "training.device=cpu",
        "training.per_device_train_batch_size=8", "training.max_steps=12",
        "training.logging_steps=4", "training.eval_steps=6", "training.weight_decay=0.1",
        "training.learning_rate=1e-3", "generation.max_new_tokens=4",
        "generation.samples_per_prompt=1", "generation.prompts=[Call me]",
        "arms=[{kind: full}, {kind: plan, select: 'layers=2: roles=q,k,v'}]",
    ])
    return run(cfg, out, overwrite=True)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_run_with_the_prefix_cache_trains_what_a_run_without_it_trains(
        tmp_path: Path, accumulation: int) -> None:
    """With accumulation the micro-batches' token ids, chunk ids and device ids must stay
    aligned: a misaligned cache would feed a window another window's prefix."""
    corpus = tmp_path / "c.txt"  # ~1.8k training tokens: 57 chunks, 7 steps per epoch
    corpus.write_text("Call me Ishmael. Some years ago, never mind how long precisely. " * 32)
    cached = _epochs_run(corpus, tmp_path / "cached", "auto", accumulation)["arms"]
    plain = _epochs_run(corpus, tmp_path / "plain", "false", accumulation)["arms"]
    pc = cached["plan"]["prefix_cache"]
    assert pc["blocks_cached"] == 2 and pc["hits"] > 0 and pc["misses"] >= 57
    assert "trains block 0" in cached["full"]["prefix_cache"]["off"]
    assert "prefix_cache=false" in plain["plan"]["prefix_cache"]["off"]

    def rows(d: Path) -> list[dict]:
        return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()
                if '"kind": "train"' in x]

    for a, b in zip(rows(tmp_path / "cached"), rows(tmp_path / "plain"), strict=True):
        assert a["batch_hash"] == b["batch_hash"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6)
        assert a["dw"] == pytest.approx(b["dw"], rel=1e-4, abs=1e-7)
    for arm in ("full", "plan"):
        x = load_file(str(tmp_path / "cached" / "arms" / arm / "trained.safetensors"))
        y = load_file(str(tmp_path / "plain" / "arms" / arm / "trained.safetensors"))
        for k in x:
            assert torch.allclose(x[k], y[k], rtol=0, atol=1e-6), k
    assert cached["plan"]["integrity"]["ok"]
    md = render_report(tmp_path / "cached")["md"].read_text(encoding="utf-8")
    line = (f"Frozen-prefix cache, **plan**: blocks 0–1 of 4 computed once per chunk and "
            f"read back after: {pc['misses']} windows computed")
    assert line in md
    assert "Frozen-prefix cache" not in render_report(tmp_path / "plain")["md"].read_text()


def test_prefix_cache_true_is_refused_where_it_cannot_work(make_config) -> None:
    with pytest.raises(PfreezeError, match="needs data.sampling=epochs"):
        make_config("training.prefix_cache=true")
    cfg = make_config("training.prefix_cache=true", "data.sampling=epochs",
                      "model.name=random:llama", "arms=[{kind: full}]")
    lm = load_model("random:llama", seed=0)
    loop = Loop(cfg, files=None)  # type: ignore[arg-type]
    loop.stream = BatchStream(list(range(400)), 32, 2, 0, "epochs")
    with pytest.raises(PfreezeError, match="no arm can use it"):
        loop.build_arms(lm.model, lm.family)


def test_every_cached_arm_pays_its_own_misses_within_one_budget() -> None:
    """Step times are compared across arms: no arm may ride on another's cache fills."""
    lm, infos, trained = _trained("random:llama", "upper")  # f = 2
    width = lm.model.config.hidden_size
    caches = Caches(4, 16, CPU, limit=2 * 4 * 16 * width * 4)  # room for two caches
    a, _ = caches.for_arm(lm.model, lm.family, trained, infos, True)
    b, _ = caches.for_arm(lm.model, lm.family, trained, infos, True)
    assert a is not None and b is not None and a.have is not b.have
    x = torch.randint(0, 250, (4, 16), generator=torch.Generator().manual_seed(2))
    ids = torch.arange(4)
    h = a.inputs(x, ids, ids)
    assert torch.equal(b.inputs(x, ids, ids), h) and (b.hits, b.misses) == (0, 4)
    c, why = caches.for_arm(lm.model, lm.family, trained, infos, True)
    assert c is None and "GiB left of a quarter of memory" in why
