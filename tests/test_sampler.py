"""pfreeze.measure.sampler: its KV cache decodes what transformers decodes; top-k sampling."""

from __future__ import annotations

import collections

import pytest
import torch

from pfreeze.errors import PfreezeError
from pfreeze.measure.generation import _left_padded, generate_samples
from pfreeze.measure.sampler import sample
from pfreeze.models.families import sampler_model_types
from pfreeze.models.load import load_model
from pfreeze.settings import GenerationConfig

CPU = torch.device("cpu")
ROWS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23]]  # unequal: left padding


@pytest.mark.parametrize("name", ["random:llama", "random:gpt2", "random:gpt-neox", "lora"])
def test_greedy_decoding_equals_transformers_generate(name: str, lively) -> None:
    if name == "lora":  # a LoRA arm samples through peft's wrapper (B != 0: it counts)
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(lively("random:llama").model,
                               LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False)).eval()
    else:
        model = lively(name).model
    x, mask = _left_padded(ROWS, 0)
    ours = sample(model, x, (mask == 0).sum(1), 12, top_k=1, temperature=1.0, eos=None,
                  seed=0, bf16=False, graph=False)
    hf = model.generate(input_ids=x, attention_mask=mask, do_sample=False, max_new_tokens=12,
                        min_new_tokens=12, pad_token_id=0)[:, x.shape[1]:]
    assert torch.equal(ours, hf)
    for row, got in zip(ROWS, ours.tolist(), strict=True):  # as if each prompt were alone
        alone = model.generate(input_ids=torch.tensor([row]), do_sample=False,
                               max_new_tokens=12, pad_token_id=0)[0, len(row):].tolist()
        assert got == alone and len(set(got)) > 3  # context-dependent output
    assert model.config._attn_implementation == "sdpa"  # the model's own attention is back


def test_draws_follow_the_top_k_distribution_and_never_emit_eos() -> None:
    """Gumbel-max over the top k: the first token's frequencies match softmax(top-k / T)."""
    model = load_model("random:llama", seed=0).model.eval()
    x = torch.tensor([[5, 6, 7]] * 4000)
    with torch.no_grad():
        logits = model(input_ids=x[:1]).logits[0, -1].double()
    eos = int(logits.argmax())  # the likeliest token is forbidden
    logits[eos] = float("-inf")
    top, idx = (logits / 0.7).topk(4)
    want = dict(zip(idx.tolist(), torch.softmax(top, 0).tolist(), strict=True))
    got = sample(model, x, torch.zeros(4000, dtype=torch.long), 2, top_k=4, temperature=0.7,
                 eos=eos, seed=3, bf16=False, graph=False)
    assert eos not in got.flatten().tolist()
    counts = collections.Counter(got[:, 0].tolist())
    assert set(counts) <= set(want)
    for token, p in want.items():  # 4000 draws: 4 standard errors is < 0.032
        assert counts[token] / 4000 == pytest.approx(p, abs=0.032)
    again = sample(model, x[:8], torch.zeros(8, dtype=torch.long), 2, top_k=4,
                   temperature=0.7, eos=eos, seed=3, bf16=False, graph=False)
    assert torch.equal(again, sample(model, x[:8], torch.zeros(8, dtype=torch.long), 2,
                                     top_k=4, temperature=0.7, eos=eos, seed=3, bf16=False,
                                     graph=False))


@pytest.mark.slow
def test_the_compiled_decode_step_samples_what_the_eager_one_samples(lively) -> None:
    model = lively("random:llama").model
    x, mask = _left_padded(ROWS, 0)
    kw = dict(top_k=5, temperature=1.0, eos=None, seed=0, bf16=False)
    eager = sample(model, x, (mask == 0).sum(1), 10, graph=False, **kw)
    assert torch.equal(sample(model, x, (mask == 0).sum(1), 10, graph=True, **kw), eager)


def test_generation_decoder_setting_and_its_limits() -> None:
    lm = load_model("random:gpt2", seed=0)
    cfg = GenerationConfig(prompts=["Call me", "The whale was"], samples_per_prompt=2,
                           max_new_tokens=6, decoder="pfreeze")
    samples = generate_samples(lm.model, lm.tokenizer, cfg, {32}, CPU, False)
    assert [len(s.ids) for s in samples] == [6] * 4
    assert [s.prompt for s in samples] == ["Call me"] * 2 + ["The whale was"] * 2
    with pytest.raises(PfreezeError, match="needs generation.top_k"):
        generate_samples(lm.model, lm.tokenizer, cfg.model_copy(update={"top_k": None}),
                         {32}, CPU, False)
    neo = load_model("random:gpt-neo", seed=0)
    with pytest.raises(PfreezeError, match="this one: gpt_neo"):
        generate_samples(neo.model, neo.tokenizer, cfg, {32}, CPU, False)


def test_auto_decoder_is_pfreeze_on_a_gpu_where_it_serves_the_model() -> None:
    from pfreeze.measure.sampler import resolve

    llama, neo = (load_model(n, seed=0).model for n in ("random:llama", "random:gpt-neo"))
    gpu = torch.device("cuda")  # resolve() only reads the device's type
    assert resolve("auto", llama, 50, gpu) == "pfreeze"
    assert resolve("auto", llama, 50, CPU) == "generate"
    assert resolve("auto", llama, None, gpu) == "generate"  # needs top_k
    assert resolve("auto", neo, 50, gpu) == "generate"
    assert resolve("generate", llama, 50, gpu) == "generate"
    assert resolve("pfreeze", llama, 50, CPU) == "pfreeze"
    with pytest.raises(PfreezeError, match="this one: gpt_neo"):
        resolve("pfreeze", neo, 50, gpu)


def test_the_decode_step_compiles_once_for_every_call_and_arm(monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """A recompile per call would cost a compile per arm and moment, and dynamo gives up
    (runs eagerly) after 8: the step must not capture per-call objects dynamo guards on."""
    from torch._dynamo.testing import CompileCounter

    counter, compile_ = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend=counter))
    x, mask = _left_padded(ROWS, 0)
    for seed in range(4):  # two models (arms), new state and noise every call
        model = load_model("random:llama", seed=seed % 2).model.eval()
        sample(model, x, (mask == 0).sum(1), 4, top_k=5, temperature=1.0, eos=None,
               seed=seed, bf16=False, graph=True)
    assert counter.frame_count == 1


def test_the_summary_says_why_auto_did_not_use_pfreezes_sampler(tiny_run) -> None:  # noqa: ANN001
    from pfreeze.measure.sampler import why_not
    from pfreeze.models.load import load_model

    gpu = torch.device("cuda")  # only its type is read
    assert why_not(load_model("random:llama").model, 50, gpu) is None
    assert why_not(load_model("random:gpt-neo").model, 50, gpu) == (
        "pfreeze's sampler needs generation.top_k and a model of type "
        f"{', '.join(sampler_model_types())} (this one: gpt_neo)")
    assert "top_k" in why_not(load_model("random:llama").model, None, gpu)
    execution = tiny_run.summary["execution"]  # a CPU run of auto
    assert execution["decoder"] == "generate"
    assert execution["decoder_note"].startswith("on the CPU generate is kept")
