"""The fast path computes what the plain path computes: compiled vs eager training."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pfreeze.attention import causal_attention, training_attention
from pfreeze.config import load_config
from pfreeze.errors import PfreezeError
from pfreeze.models import load_model
from pfreeze.train import Loop

CPU = torch.device("cpu")

STEPS = 3


def _train(corpus: Path, compiled: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    cfg = load_config(None, [
        f"data.corpus={corpus}", "model.name=random:llama", "data.block_size=16",
        "training.device=cpu",  # float32 on both paths; a GPU would autocast to bf16
        f"training.max_steps={STEPS}", "training.learning_rate=1e-2",
        "training.weight_decay=0.1", f"training.torch_compile={str(compiled).lower()}",
        "arms=[{kind: plan, select: 'layers=2: roles=q,k,v; roles=o heads=1'}]",
    ])
    lm = load_model(cfg.model.name, seed=0)
    loop = Loop(cfg, files=None)  # type: ignore[arg-type]
    loop.build_arms(lm.model, lm.family)
    arm = loop.arms[0]
    assert (arm.step_fn is not None) == compiled
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(STEPS):
        batch = torch.randint(0, 256, (2, 16), generator=gen)
        loop.train_step(arm, step, batch)
        losses.append(float(arm.pending[-1].loss))
    return losses, {n: p.detach().clone() for n, p in arm.model.named_parameters()}


@pytest.mark.slow
def test_compiled_loop_matches_eager(tmp_path: Path) -> None:
    corpus = tmp_path / "t.txt"
    corpus.write_text("abc " * 100)
    eager_losses, eager_w = _train(corpus, compiled=False)
    fast_losses, fast_w = _train(corpus, compiled=True)
    assert fast_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    # Compiled kernels reassociate fp32 sums; Adam's m/sqrt(v) amplifies that on tiny
    # gradients. 1e-4 is 0.3% of what lr=1e-2 moves a weight in three steps.
    for name, w in eager_w.items():
        assert (fast_w[name] - w).abs().max() <= 1e-4, name
    # Frozen elements are not just close but identical on both paths (whole frozen tensors,
    # and the frozen heads of the partially trainable o_proj).
    theta0 = dict(load_model("random:llama", seed=0).model.named_parameters())
    q0 = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(fast_w[q0], theta0[q0]) and torch.equal(eager_w[q0], theta0[q0])
    o0 = "model.layers.0.self_attn.o_proj.weight"  # heads=1 -> input columns 16:32 train
    frozen_cols = torch.ones(64, dtype=torch.bool)
    frozen_cols[16:32] = False
    for w in (fast_w, eager_w):
        assert torch.equal(w[o0][:, frozen_cols], theta0[o0][:, frozen_cols])
        assert not torch.equal(w[o0][:, 16:32], theta0[o0][:, 16:32])


@pytest.mark.slow
def test_compilation_is_paid_once_per_arm_shape(tmp_path: Path) -> None:
    """Arms that train the same tensors of the same model share one compiled step: the second
    captures no graph and compiles nothing; an arm that trains other tensors compiles its own
    (dynamo guards on requires_grad). The sharing is dynamo's cache, which pfreeze relies on
    by compiling each arm the same way: a module of one class (execution.LossOf) around the
    arm's model keeps it, since dynamo caches on the class's forward; a per-arm closure
    would not."""
    from torch._dynamo.utils import counters

    corpus = tmp_path / "t.txt"
    corpus.write_text("abc " * 100)
    cfg = load_config(None, [
        f"data.corpus={corpus}", "model.name=random:llama", "data.block_size=16",
        "training.device=cpu", "training.max_steps=2", "training.torch_compile=true",
        "arms=[{kind: plan, name: a, select: 'layers=2: roles=q,k,v'},"
        " {kind: plan, name: b, select: 'layers=2: roles=q,k,v'}, {kind: full}]",
    ])
    torch._dynamo.reset()
    lm = load_model(cfg.model.name, seed=0)
    loop = Loop(cfg, files=None)  # type: ignore[arg-type]
    loop.build_arms(lm.model, lm.family)
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    graphs = []
    for arm in loop.arms:
        before = counters["stats"]["unique_graphs"]
        loop.train_step(arm, 0, batch)
        graphs.append(counters["stats"]["unique_graphs"] - before)
    assert graphs == [1, 0, 1]


def _grads(model_name: str, backend: str, compiled: bool = False
           ) -> tuple[float, list[torch.Tensor]]:
    """Loss and q/k/v gradients of one training forward under `backend`."""
    lm = load_model(model_name, seed=0)
    model = lm.model.train()
    fwd = torch.compile(model, dynamic=False) if compiled else model
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    with training_attention(model, backend):
        loss = fwd(input_ids=x, labels=x).loss
    assert model.config._attn_implementation != "pfreeze_causal"  # restored after the step
    params = [p for n, p in model.named_parameters() if "attn" in n or "attention" in n]
    return float(loss), list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize("model", ["random:llama", "random:gpt2", "random:gpt-neox"])
@pytest.mark.parametrize("backend", ["flash", "sdpa", "math"])
def test_attention_backends_give_the_models_loss_and_gradients(model: str, backend: str
                                                               ) -> None:
    """flash and sdpa run the mask-free causal path (grouped KV heads passed as they are for
    Llama)."""
    ref_loss, ref = _grads(model, "model")
    loss, got = _grads(model, backend)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_the_causal_path_hands_grouped_kv_heads_to_sdpa_as_they_are(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.nn.functional as F  # noqa: N812

    sdpa = F.scaled_dot_product_attention
    lm = load_model("random:llama", seed=0)  # 4 query heads share 2 KV heads
    seen: list[tuple[str, int, int, bool]] = []

    def spy(q, k, v, **kw):  # noqa: ANN001, ANN003, ANN202
        seen.append((lm.model.config._attn_implementation, q.shape[1], k.shape[1],
                     kw.get("enable_gqa", False)))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    x = torch.randint(0, 256, (2, 16))
    with training_attention(lm.model, "flash"):
        lm.model(input_ids=x, labels=x, use_cache=False)
    assert seen == [("pfreeze_causal", 4, 2, True)] * 4  # pfreeze's path, not the model's


def test_flash_runs_pfreezes_causal_function_in_every_block(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    lm = load_model("random:llama", seed=0)
    with training_attention(lm.model, "flash"):  # registers the function
        pass
    calls: list[tuple[int, ...]] = []

    def spy(module, query, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(tuple(query.shape))
        return causal_attention(module, query, *args, **kw)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "pfreeze_causal", spy)
    x = torch.randint(0, 256, (2, 16))
    with training_attention(lm.model, "flash"):
        lm.model(input_ids=x, labels=x)
    assert calls == [(2, 4, 16, 16)] * 4  # 4 blocks, 4 query heads, head_dim 16
    lm.model(input_ids=x, labels=x)  # outside the step: the model's own attention again
    assert len(calls) == 4


@pytest.mark.slow
def test_mask_free_causal_attention_compiles_and_matches_eager() -> None:
    eager_loss, eager = _grads("random:llama", "flash")
    loss, got = _grads("random:llama", "flash", compiled=True)
    assert loss == pytest.approx(eager_loss, rel=1e-5)
    for a, b in zip(got, eager, strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("backend", ["flash", "sdpa"])
def test_a_training_step_runs_the_causal_path_and_restores_the_models_attention(
        make_config, monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """Both run pfreeze's causal function; flash alone restricts SDPA to one kernel."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cfg = make_config("model.name=random:llama", f"training.attention_backend={backend}")
    lm = load_model("random:llama", seed=0)
    loop = Loop(cfg, files=None)  # type: ignore[arg-type]
    loop.build_arms(lm.model, lm.family)  # registers nothing yet: the first step does
    with training_attention(lm.model, backend):
        pass
    others: list[bool] = []  # per call: may SDPA use a kernel other than flash?

    def spy(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        others.append(torch.backends.cuda.math_sdp_enabled())
        return causal_attention(*args, **kw)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "pfreeze_causal", spy)
    loop.train_step(loop.arms[0], 0, torch.randint(0, 256, (2, 32)))
    assert loop.attention == backend
    assert others == [backend == "sdpa"] * lm.model.config.num_hidden_layers
    assert loop.arms[0].model.config._attn_implementation == "sdpa"
    assert torch.backends.cuda.math_sdp_enabled()  # restored after the step


def test_causal_attention_refuses_masks_and_caches_and_cudnn_needs_a_gpu(make_config) -> None:
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="mask or a KV cache"):
        causal_attention(None, q, q, q, torch.ones(1, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="mask or a KV cache"):
        causal_attention(None, q[:, :, :1], q, q, None)
    for backend in ("cudnn", "efficient"):
        with pytest.raises(PfreezeError, match=f"attention_backend={backend} needs a CUDA GPU"):
            Loop(make_config(f"training.attention_backend={backend}"), files=None)  # type: ignore


@pytest.mark.parametrize("setting, message", [
    ({"sliding_window": 8}, "has no sliding window (this model's is 8 tokens, windows are 32)"),
    ({"attn_logit_softcapping": 50.0}, "has no attention soft-capping"),
    ({"attention_dropout": 0.1}, "on the CPU has no attention dropout, but this model's is 0.1"),
])
@pytest.mark.parametrize("backend", ["flash", "sdpa"])
def test_flash_refuses_models_whose_attention_it_would_change(make_config, setting: dict,
                                                              message: str, backend: str) -> None:
    lm = load_model("random:llama", seed=0)
    for key, value in setting.items():
        setattr(lm.model.config, key, value)
    loop = Loop(make_config("model.name=random:llama", f"training.attention_backend={backend}"),
                files=None)  # type: ignore[arg-type]
    with pytest.raises(PfreezeError, match=re.escape(f"attention_backend={backend} {message}")):
        loop.build_arms(lm.model, lm.family)


def test_auto_attention_is_causal_sdpa_on_a_gpu_where_it_computes_the_same() -> None:
    from pfreeze.attention import resolve_backend

    lm = load_model("random:llama", seed=0)
    gpu = torch.device("cuda")  # resolve_backend only reads the device's type here

    def auto(device: torch.device = gpu, bf16: bool = True, block: int = 32,
             graphs: bool = True) -> str:
        return resolve_backend("auto", device, bf16, lm.model, block, graphs=graphs)

    assert auto() == "sdpa"
    assert auto(bf16=False) == "model"  # measured with bf16 only
    assert auto(device=CPU) == "model"
    assert auto(graphs=False) == "model"  # without CUDA graphs the path cost host time
    lm.model.config.attention_dropout = 0.1  # the GPU kernels have dropout
    assert auto() == "sdpa"
    lm.model.config.sliding_window = 8
    assert auto() == "model"
    assert auto(block=8) == "sdpa"  # the window covers the whole block
    with pytest.raises(PfreezeError, match="has no sliding window"):
        resolve_backend("flash", gpu, True, lm.model, 32, graphs=True)
    with pytest.raises(ValueError, match="resolved backend"), training_attention(lm.model, "auto"):
        pass


def test_flash_is_refused_where_it_cannot_reach_the_attention() -> None:
    """GPT-Neo's attention never calls transformers' attention functions: flash would be a
    silent no-op there, and auto must not report it."""
    from pfreeze.attention import resolve_backend, routes_attention

    neo = load_model("random:gpt-neo", seed=0).model
    for name in ("random:llama", "random:gpt2", "random:gpt-neox"):
        assert routes_attention(load_model(name, seed=0).model), name
    assert not routes_attention(neo)
    gpu = torch.device("cuda")
    assert resolve_backend("auto", gpu, True, neo, 32, graphs=True) == "model"
    for backend in ("flash", "sdpa"):
        with pytest.raises(PfreezeError, match="gpt_neo does not call transformers' attention"):
            resolve_backend(backend, CPU, False, neo, 32, graphs=False)


def test_auto_compile_mode_is_cuda_graphs_on_a_gpu_without_accumulation() -> None:
    from pfreeze.execution import resolve_compile_mode

    gpu = torch.device("cuda")
    assert resolve_compile_mode("auto", gpu, 1) == "reduce-overhead"
    assert resolve_compile_mode("auto", gpu, 2) == "default"
    assert resolve_compile_mode("auto", CPU, 1) == "default"
    assert resolve_compile_mode("max-autotune", gpu, 2) == "max-autotune"


def test_training_and_held_out_forwards_build_no_kv_cache(make_config,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """A KV cache is for decoding: built in a training forward it is filled with copies of
    every block's keys and values, handed back as outputs of the compiled graph."""
    from transformers import cache_utils

    from pfreeze.evaluate import mean_loss
    from pfreeze.rank import grad_scores

    made: list[int] = []
    init = cache_utils.DynamicCache.__init__

    def counting(self, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        made.append(1)
        init(self, *args, **kw)

    monkeypatch.setattr(cache_utils.DynamicCache, "__init__", counting)
    cfg = make_config("model.name=random:llama", "arms=[{kind: full}]")
    lm = load_model("random:llama", seed=0)
    loop = Loop(cfg, files=None)  # type: ignore[arg-type]
    loop.build_arms(lm.model, lm.family)
    x = torch.randint(0, 256, (2, 16))
    loop.train_step(loop.arms[0], 0, x)
    mean_loss(loop.arms[0].model, x, 2, CPU, False)
    grad_scores(loop.arms[0].model, lm.family, [x])
    assert made == []
    lm.model(input_ids=x)  # the check itself: a plain forward does build one
    assert made == [1]


def test_auto_compiles_only_gpu_runs_long_enough_to_pay_it_back() -> None:
    """A short run (the demo's 40 steps) stays eager: compiling costs more than it saves."""
    from pfreeze.execution import COMPILE_PAYS_AFTER, resolve_compile

    gpu = torch.device("cuda")
    assert COMPILE_PAYS_AFTER == 1000  # the break-even of docs/BENCHMARKS.md, session 6
    assert not resolve_compile("auto", gpu, 40)
    assert not resolve_compile("auto", gpu, COMPILE_PAYS_AFTER - 1)
    assert resolve_compile("auto", gpu, COMPILE_PAYS_AFTER)
    assert not resolve_compile("auto", CPU, 10**6)
    assert resolve_compile(True, CPU, 1) and not resolve_compile(False, gpu, 10**6)


@pytest.mark.parametrize("name", ["random:gpt2", "random:llama", "random:gpt-neox"])
def test_every_compiled_step_is_one_graph_whose_only_output_is_the_loss(
        name: str, tmp_path: Path) -> None:
    """What the loop compiles for each kind of arm (whole model, a cached arm's upper blocks,
    a peft LoRA wrapper) traces as one graph (GPT-2's loss does not split off at
    transformers' logged fallback) and returns the loss alone: a returned B x T x V logits
    tensor would get an all-zero gradient in the backward, filled and copied each step."""
    from pfreeze.corpus import BatchStream

    corpus = tmp_path / "t.txt"
    corpus.write_text("abc " * 100)
    cfg = load_config(None, [
        f"data.corpus={corpus}", f"model.name={name}", "data.block_size=16",
        "data.sampling=epochs", "training.device=cpu", "training.torch_compile=true",
        "arms=[{kind: full}, {kind: plan, select: 'layers=2: roles=q,k,v'},"
        " {kind: lora, select: 'roles=q,k,v', r: 2}]",
    ])
    loop = Loop(cfg, files=None)  # type: ignore[arg-type]
    loop.stream = BatchStream(list(range(400)), 16, 2, 0, "epochs")
    lm = load_model(name, seed=0)
    loop.build_arms(lm.model, lm.family)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    full, cached, lora = loop.arms
    assert cached.prefix is not None and lora.prefix is None
    for arm in loop.arms:
        if arm.prefix is None:
            inputs = {"input_ids": x}
        else:  # the upper blocks run on block f's input, as train_step feeds them
            with torch.no_grad():
                h = arm.prefix.lower(input_ids=x, use_cache=False).last_hidden_state
            inputs = {"inputs_embeds": h}
        explained = torch._dynamo.explain(arm.step_fn._orig_mod)(**inputs, labels=x,
                                                                 use_cache=False)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), arm.strategy.name
        (out,) = [n for n in explained.graphs[0].graph.nodes if n.op == "output"]
        leaves = [v for v in torch.utils._pytree.tree_leaves(out.args)
                  if isinstance(v, torch.fx.Node)]
        assert len(leaves) == 1 and leaves[0].meta["example_value"].shape == ()
