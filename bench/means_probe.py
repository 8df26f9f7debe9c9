"""What each remaining speed means would buy, measured before building it into pfreeze.

    python -m bench.means_probe --variants base,fused,ce,fused+ce,bf16+fused+ce --arms full

A plain compiled step (CUDA graphs, fused AdamW, bf16 autocast, causal SDPA without a mask)
on a random-init SmolLM2-shape model, with one attention forward for every variant so that
only the named means differ:
    fused   q/k/v in one matmul and gate/up in one (the weights stay separate parameters and
            are concatenated per step, so plans and masks would not change)
    ce      fused linear cross-entropy: the 49k-way loss and its gradient computed chunk by
            chunk inside the forward, in plain torch ops that inductor compiles; the full
            logits never exist
    bf16    bf16 weights, no autocast (an upper bound for "bf16 weights with fp32 master
            copies": the master copy's update is not included)
    flash   SDPA restricted to FlashAttention (else SDPA picks its kernel)
    pfattn  transformers' own attention code through pfreeze's causal flash route, compiled
            and entered as pfreeze's step does (no other means apply)
Prints median step time per variant and arm. GPU only (CUDA events; build() also runs on
the CPU, for checking the variants' losses and gradients against each other).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F  # noqa: N812
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from bench.common import SHAPES
from pfreeze import load_model, training_attention


def attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                      **kwargs):
    """Llama attention with causal SDPA; q/k/v in one matmul when self._fused."""
    b, t, _ = hidden_states.shape
    d = self.head_dim
    if self._fused:
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        q, k, v = F.linear(hidden_states, w).split(
            [self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features], -1)
    else:
        q, k, v = (self.q_proj(hidden_states), self.k_proj(hidden_states),
                   self.v_proj(hidden_states))
    q, k, v = (z.view(b, t, -1, d).transpose(1, 2) for z in (q, k, v))
    q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return self.o_proj(o.transpose(1, 2).reshape(b, t, -1)), None


def mlp_forward(self, x):
    w = torch.cat([self.gate_proj.weight, self.up_proj.weight])
    g, u = F.linear(x, w).chunk(2, -1)
    return self.down_proj(self.act_fn(g) * u)


class LinearCrossEntropy(torch.autograd.Function):
    """Mean next-token cross-entropy of h @ w.T against y (-100 ignored), with the gradient
    computed chunk by chunk in the forward (the loss is the graph's last op, so backward only
    scales it)."""

    @staticmethod
    def forward(ctx, h, w, y, chunk):  # noqa: ANN001, ANN205
        hb, wb = h.to(torch.bfloat16), w.to(torch.bfloat16)
        valid = y != -100
        n = valid.sum().clamp(min=1).float()
        gh = torch.empty_like(hb)
        gw = torch.zeros_like(w, dtype=torch.float32) if w.requires_grad else None
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, h.shape[0], chunk):
            z = (hb[i:i + chunk] @ wb.T).float()
            yi, vi = y[i:i + chunk].clamp(min=0), valid[i:i + chunk]
            lse = torch.logsumexp(z, -1)
            total = total + ((lse - z.gather(1, yi[:, None]).squeeze(1)) * vi).sum()
            g = torch.exp(z - lse[:, None])
            g = g - F.one_hot(yi, z.shape[1]).to(g.dtype)
            g = (g * (vi.float() / n)[:, None]).to(torch.bfloat16)
            gh[i:i + chunk] = g @ wb
            if gw is not None:
                gw += (g.T @ hb[i:i + chunk]).float()
        ctx.save_for_backward(gh, gw if gw is not None else gh.new_empty(0))
        ctx.has_gw = gw is not None
        return total / n

    @staticmethod
    def backward(ctx, go):  # noqa: ANN001, ANN205
        gh, gw = ctx.saved_tensors
        return gh * go, (gw * go if ctx.has_gw else None), None, None


def build(variant: str, arm: str, device: torch.device, shape: str):
    model = load_model(SHAPES[shape], seed=0).model.to(device)
    fused = "fused" in variant
    if "pfattn" in variant:  # transformers' attention through pfreeze's causal flash route
        return _pfattn(model, arm, device)
    for layer in model.model.layers:
        a = layer.self_attn
        a._fused = fused
        a.forward = attention_forward.__get__(a)
        if fused:
            layer.mlp.forward = mlp_forward.__get__(layer.mlp)
    _freeze(model, arm)
    if "bf16" in variant:
        model.to(torch.bfloat16)
    use_ce = "ce" in variant.split("+")

    def loss_fn(x):
        if "flash" in variant.split("+"):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return inner(x)
        return inner(x)

    def inner(x):
        y = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], 1).reshape(-1)
        with torch.autocast(device.type, torch.bfloat16, enabled="bf16" not in variant):
            if not use_ce:
                return model(input_ids=x, labels=x, use_cache=False).loss
            h = model.model(input_ids=x, use_cache=False).last_hidden_state
        return LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), model.lm_head.weight, y,
                                        2048)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=True)
    if device.type != "cuda":
        return loss_fn, opt, model
    return torch.compile(loss_fn, mode="reduce-overhead", dynamic=False), opt, model


def _freeze(model, arm: str) -> None:
    if arm == "frozen":
        n = len(model.model.layers)
        for name, p in model.named_parameters():
            p.requires_grad_(any(f"layers.{i}.self_attn.{r}_proj" in name
                                 for i in range(n // 2, n) for r in "qkv"))


def _pfattn(model, arm: str, device: torch.device):
    """As pfreeze's step runs it: the module compiled, the attention route entered outside."""
    _freeze(model, arm)
    compiled = torch.compile(model, mode="reduce-overhead", dynamic=False)

    def loss_fn(x):
        with torch.autocast(device.type, torch.bfloat16), training_attention(model, "flash"):
            return compiled(input_ids=x, labels=x, use_cache=False).loss
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=True)
    return loss_fn, opt, model


def measure(variant: str, arm: str, batch: int, seq: int, steps: int, warmup: int,
            shape: str) -> dict:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step, opt, model = build(variant, arm, dev, shape)
    x = torch.randint(0, model.config.vocab_size, (batch, seq), device=dev)
    t0 = time.perf_counter()
    times, losses = [], []
    for i in range(warmup + steps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        torch.compiler.cudagraph_mark_step_begin()
        loss = step(x)
        losses.append(loss.detach().clone())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        e.record()
        if i == 0:
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
        if i >= warmup:
            times.append((s, e))
    torch.cuda.synchronize()
    ms = statistics.median(s.elapsed_time(e) for s, e in times)
    peak = torch.cuda.max_memory_allocated() / 2**20
    row = dict(variant=variant, arm=arm, batch=f"{batch}x{seq}", ms=round(ms, 2),
               tok_s=round(batch * seq / ms * 1e3), compile_s=round(compile_s, 1),
               loss0=round(float(losses[0]), 4), loss_last=round(float(losses[-1]), 4),
               peak_mib=round(peak))
    print(row, flush=True)
    del step, opt, model
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="base,fused,ce,fused+ce,bf16+fused+ce")
    ap.add_argument("--arms", default="full")
    ap.add_argument("--batch", default="32x512")
    ap.add_argument("--shape", default="smollm2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    a = ap.parse_args()
    b, t = map(int, a.batch.split("x"))
    for arm in a.arms.split(","):
        for v in a.variants.split(","):
            try:
                measure(v, arm, b, t, a.steps, a.warmup, a.shape)
            except Exception as e:  # a failing variant must not cost the others
                print(dict(variant=v, arm=arm, error=f"{type(e).__name__}: {e}"[:400]), flush=True)


if __name__ == "__main__":
    main()
