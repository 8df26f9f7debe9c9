"""The benchmark's generation rows: new tokens/s of the batched sampling behind the p metric.

Run by `python -m bench` before the training rows (--gen, the default): short, and a
time-bounded call should not lose them. Functions take the Bench that owns the settings, the
device and the output rows (a Runner: what they use of it; this module does not import the
driver, which imports it).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from bench.common import SHAPES, Row
from bench.results import gen_key, gen_line, replace_row
from pfreeze import GenerationConfig, generate_samples, load_model

GEN_VARIANTS = ("pfreeze_eager", "pfreeze_static", "pfreeze_graph", "static_bf16")


class Runner(Protocol):
    """What these functions use of the driver's Bench."""

    a: argparse.Namespace
    dev: torch.device
    cuda: bool
    process: int
    kept_gen: set[tuple[Any, ...]]
    out: Row

    def sync(self) -> None: ...
    def guarded(self, row: Row, need: float, fn: Callable[[], Row]) -> None: ...
    def write(self) -> None: ...


def run_generation(bench: Runner) -> None:
    """New tokens/s of batched top-k sampling, the p metric's generation.

    pfreeze_eager / pfreeze_static: evaluate.generate_samples itself (fp32 weights under
    autocast, all prompts x samples in one batch), dynamic / static KV cache (the static
    decode step is compiled by transformers); pfreeze_graph: generation.decoder=pfreeze
    (pfreeze.sampler, the decode step in a CUDA graph). static_bf16: plain `generate` on
    bf16 weights with a static cache, for reference."""
    a = bench.a
    shape = a.gen_shape or ("smollm2" if bench.cuda else "tiny")
    rows = [{"variant": name, "shape": shape, "batch": a.gen_batch, "prompt_tokens": a.gen_prompt,
             "new_tokens": a.gen_new, "process": bench.process} for name in a.gen_variants]
    rows = [r for r in rows if gen_key(r) not in bench.kept_gen]  # kept: --resume
    if not rows:
        return
    lm = load_model(SHAPES.get(shape, shape), seed=a.seed)
    eos = lm.model.config.vocab_size - 1
    x = torch.randint(0, eos, (a.gen_batch, a.gen_prompt),
                      generator=torch.Generator().manual_seed(a.seed)).to(bench.dev)
    kw = dict(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True, top_k=50,
              max_new_tokens=a.gen_new, min_new_tokens=a.gen_new, pad_token_id=eos,
              eos_token_id=eos, cache_implementation="static")
    for row in rows:
        name = row["variant"]
        fn = ((lambda: sample(bench, lm.model, kw)) if name == "static_bf16" else
              (lambda n=name: sample_pfreeze(bench, lm, n)))
        bench.guarded(row, 15 if name == "pfreeze_eager" else a.compile_reserve, fn)
        replace_row(bench.out["generation"], row, gen_key)
        print(gen_line(row), flush=True)
        bench.write()


def timed_calls(bench: Runner, go: Callable[[], None]) -> Row:
    a = bench.a
    secs = []
    for _ in range(a.gen_warmup + a.gen_reps):
        t0 = time.perf_counter()
        go()
        bench.sync()
        secs.append(time.perf_counter() - t0)
    warm, timed = secs[: a.gen_warmup], statistics.median(secs[a.gen_warmup :])
    return {"warmup_s": sum(warm), "first_call_s": warm[0] if warm else None,
            "seconds": timed, "new_tokens_per_s": a.gen_batch * a.gen_new / timed}


def sample_pfreeze(bench: Runner, lm: Any, variant: str) -> Row:
    a = bench.a
    n_prompts = min(8, a.gen_batch)
    if a.gen_batch % n_prompts:
        raise ValueError(f"--gen-batch {a.gen_batch} is not a multiple of {n_prompts}")
    # Distinct prompts of gen_prompt bytes (the shapes' tokenizer is bytes: one token each).
    prompts = [f"{i:0{a.gen_prompt}d}"[-a.gen_prompt :] for i in range(n_prompts)]
    cfg = GenerationConfig(prompts=prompts, samples_per_prompt=a.gen_batch // n_prompts,
                           max_new_tokens=a.gen_new,
                           decoder="pfreeze" if variant == "pfreeze_graph" else "generate")
    static = variant == "pfreeze_static"
    model = copy.deepcopy(lm.model).to(bench.dev)

    def go() -> None:
        out = generate_samples(model, lm.tokenizer, cfg, {0}, bench.dev, bench.cuda, static)
        if len(out) != a.gen_batch or any(len(s.ids) != a.gen_new for s in out):
            raise RuntimeError("generate_samples returned the wrong number of tokens")

    return timed_calls(bench, go)


def sample(bench: Runner, base: nn.Module, kw: Row) -> Row:
    model = copy.deepcopy(base).to(bench.dev).eval()
    model = model.to(torch.bfloat16) if bench.cuda else model
    want = (bench.a.gen_batch, bench.a.gen_prompt + bench.a.gen_new)

    def go() -> None:
        with torch.no_grad():
            out = model.generate(**kw)
        if tuple(out.shape) != want:
            raise RuntimeError(f"generate returned {tuple(out.shape)}, expected {want}")

    return timed_calls(bench, go)
