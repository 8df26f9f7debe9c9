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
        losses.append(float(arm.pending[-1][1]))
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
@pytest.mark.parametrize("backend", ["flash", "math"])
def test_attention_backends_give_the_models_loss_and_gradients(model: str, backend: str
                                                               ) -> None:
    """flash runs the mask-free causal path (grouped KV heads passed as they are for Llama)."""
    ref_loss, ref = _grads(model, "model")
    loss, got = _grads(model, backend)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)

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


def test_a_training_step_runs_flash_and_restores_the_models_attention(
        make_config, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cfg = make_config("model.name=random:llama", "training.attention_backend=flash")
    lm = load_model("random:llama", seed=0)
    loop = Loop(cfg, files=None)  # type: ignore[arg-type]
    loop.build_arms(lm.model, lm.family)  # registers nothing yet: the first step does
    with training_attention(lm.model, "flash"):
        pass
    calls: list[int] = []

    def spy(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return causal_attention(*args, **kw)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "pfreeze_causal", spy)
    loop.train_step(loop.arms[0], 0, torch.randint(0, 256, (2, 32)))
    assert loop.attention == "flash" and len(calls) == lm.model.config.num_hidden_layers
    assert loop.arms[0].model.config._attn_implementation == "sdpa"


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
def test_flash_refuses_models_whose_attention_it_would_change(make_config, setting: dict,
                                                              message: str) -> None:
    lm = load_model("random:llama", seed=0)
    for key, value in setting.items():
        setattr(lm.model.config, key, value)
    loop = Loop(make_config("model.name=random:llama", "training.attention_backend=flash"),
                files=None)  # type: ignore[arg-type]
    with pytest.raises(PfreezeError, match=re.escape(message)):
        loop.build_arms(lm.model, lm.family)


def test_auto_attention_is_flash_on_a_gpu_where_it_computes_the_same_attention() -> None:
    from pfreeze.attention import resolve_backend

    lm = load_model("random:llama", seed=0)
    gpu = torch.device("cuda")  # resolve_backend only reads the device's type here

    def auto(device: torch.device = gpu, bf16: bool = True, block: int = 32,
             graphs: bool = True) -> str:
        return resolve_backend("auto", device, bf16, lm.model, block, graphs=graphs)

    assert auto() == "flash"
    assert auto(bf16=False) == "model"  # flash takes no fp32
    assert auto(device=CPU) == "model"
    assert auto(graphs=False) == "model"  # without CUDA graphs flash cost host time
    lm.model.config.attention_dropout = 0.1  # the GPU kernel has dropout
    assert auto() == "flash"
    lm.model.config.sliding_window = 8
    assert auto() == "model"
    assert auto(block=8) == "flash"  # the window covers the whole block
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
    with pytest.raises(PfreezeError, match="gpt_neo does not call transformers' attention"):
        resolve_backend("flash", CPU, False, neo, 32, graphs=False)


def test_auto_compile_mode_is_cuda_graphs_on_a_gpu_without_accumulation() -> None:
    from pfreeze.execution import resolve_compile_mode

    gpu = torch.device("cuda")
    assert resolve_compile_mode("auto", gpu, 1) == "reduce-overhead"
    assert resolve_compile_mode("auto", gpu, 2) == "default"
    assert resolve_compile_mode("auto", CPU, 1) == "default"
    assert resolve_compile_mode("max-autotune", gpu, 2) == "max-autotune"


def test_liger_kernels_are_refused_in_one_line_where_they_cannot_run(make_config) -> None:
    with pytest.raises(PfreezeError, match="kernels=liger needs a CUDA GPU"):
        Loop(make_config("training.kernels=liger"), files=None)  # type: ignore[arg-type]
    with pytest.raises(PfreezeError, match="Extra inputs|kernels"):
        make_config("training.kernels=triton")


def test_liger_kernels_patch_every_arms_base_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wiring only (the kernels are Triton: GPU): liger's instance patcher gets each arm's
    model, unwrapped from peft, and an unknown model type or a missing package is refused."""
    import sys
    import types

    from peft import LoraConfig, get_peft_model

    from pfreeze.execution import apply_kernels

    got: list[object] = []
    fake = types.ModuleType("liger_kernel.transformers.monkey_patch")
    fake.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": None}  # type: ignore[attr-defined]
    fake._apply_liger_kernel_to_instance = lambda model: got.append(model)  # type: ignore
    pkg = types.ModuleType("liger_kernel.transformers")
    pkg.monkey_patch = fake  # type: ignore[attr-defined]
    for name, mod in (("liger_kernel", types.ModuleType("liger_kernel")),
                      ("liger_kernel.transformers", pkg),
                      ("liger_kernel.transformers.monkey_patch", fake)):
        monkeypatch.setitem(sys.modules, name, mod)
    gpu = torch.device("cuda")  # only its type is read before the patcher runs
    llama = load_model("random:llama", seed=0).model
    apply_kernels(llama, "liger", gpu)
    lora = get_peft_model(load_model("random:llama", seed=0).model,
                          LoraConfig(r=2, target_modules=["q_proj"]))
    apply_kernels(lora, "liger", gpu)
    assert got == [llama, lora.get_base_model()]
    apply_kernels(llama, "none", gpu)
    assert len(got) == 2
    with pytest.raises(PfreezeError, match="no kernels for model type 'gpt_neo'"):
        apply_kernels(load_model("random:gpt-neo", seed=0).model, "liger", gpu)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", None)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    with pytest.raises(PfreezeError, match="needs the liger-kernel package"):
        apply_kernels(llama, "liger", gpu)


def test_build_arms_patches_kernels_into_every_arms_model(make_config,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import pfreeze.execution

    seen: list[tuple[object, str]] = []
    monkeypatch.setattr(pfreeze.execution, "apply_kernels", lambda m, k, d: seen.append((m, k)))
    cfg = make_config("model.name=random:llama",
                      "arms=[{kind: full}, {kind: plan, select: 'roles=q'}, {kind: lora}]")
    loop = Loop(cfg, files=None)  # type: ignore[arg-type]
    lm = load_model("random:llama", seed=0)
    loop.build_arms(lm.model, lm.family)
    assert seen == [(a.model, "none") for a in loop.arms] and len(seen) == 3
