"""Where the GPU time of one pfreeze training step (or one sampling call) goes, by kernel kind.

    python -m bench.profile_step --shape smollm2 --batch 32x512 [--mode reduce-overhead]
    python -m bench.profile_step --generate --gen-batch 64

Training: builds pfreeze's Loop for the full arm, the frozen arm (q,k,v of the upper half) and
the frozen arm with its prefix cached (epochs sampling), compiled; after warm-up, profiles
--steps steps and prints per step: wall time, GPU busy time, kernel launches, and the kernel
time by kind (matmul, attention, fused Triton, optimizer, copies), plus the largest kernels
with their launches per step; --who adds the host code that launched each of those. Then it
runs one step with CUDA's sync debug mode raising, to show any host sync. Each profiled step
draws its batch (loop.stream.next()) inside the profiled region: that host work is in the
wall time, though not in the GPU's.
Generation: profiles one evaluate.generate_samples call the same way (per decode step).
"""

from __future__ import annotations

import argparse
import re
import time
from collections import defaultdict
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import ROTATED, SHAPES, pfreeze_loop
from pfreeze import FullArm, GenerationConfig, PlanArm, generate_samples, load_model, release

# First match wins: attention before matmul (cuDNN's SDPA kernels carry "sm90" too), Triton
# before copies (inductor names fused kernels after their ops, "to_copy" included).
KINDS = [("attention", r"flash|fmha|attention|sdpa"),
         ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|splitk"),
         ("triton (fused elementwise, norms, loss)", r"^triton"),
         ("optimizer", r"adam|multi_tensor|foreach"),
         ("copy/fill", r"memcpy|memset|copy|fill|cat"),
         ("other", r".")]


def kernel_times(prof: profile) -> tuple[dict[str, float], dict[str, int]]:
    """Self device time (ms) and launches of every kernel name over the profiled region."""
    out: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    # record_function ranges (e.g. "Optimizer.step#AdamW.step") also appear on the GPU's
    # timeline, spanning the kernels they launched: counting them too double-counts that time
    # (the profiles of session 7 did: about 1 ms of "optimizer" per step).
    ranges = {e.name for e in prof.events() if getattr(e, "is_user_annotation", False)}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if t and str(e.device_type).endswith("CUDA") and e.key not in ranges:
            out[e.key] += t / 1e3
            count[e.key] += e.count
    return out, count


def report(title: str, prof: profile, wall_ms: float, n: int, top: int) -> dict[str, float]:
    """Print where the profiled steps' time went; return the kernel times it summed."""
    k, count = kernel_times(prof)
    launches = sum(count.values())
    busy = sum(k.values())
    by_kind: dict[str, float] = defaultdict(float)
    for name, ms in k.items():
        kind = next(kd for kd, rx in KINDS if re.search(rx, name, re.I))
        by_kind[kind] += ms
    print(f"\n== {title}: wall {wall_ms / n:.2f} ms/step, GPU busy {busy / n:.2f} ms/step "
          f"({busy / max(wall_ms, 1e-9):.0%}); {launches / n:.0f} kernels/step, "
          f"{1e3 * busy / max(launches, 1):.1f} us each on average")
    # Many short kernels point at launch-bound time (each costs a few us even in a CUDA graph);
    # few long ones at the kernels themselves.
    for kind, _ in KINDS:
        if by_kind[kind]:
            print(f"   {kind:42} {by_kind[kind] / n:8.2f} ms  {by_kind[kind] / busy:6.1%}")
    for name, ms in sorted(k.items(), key=lambda kv: -kv[1])[:top]:
        # the count tells one large copy from many small ones of the same total
        print(f"   {ms / n:8.3f} ms  {count[name] / n:5.0f}x  {name[:100]}")
    # The host's side: where a step's wall time goes when the GPU waits for it (CUDA runtime
    # calls appear here too; a long cudaMemcpyAsync or cudaStreamSynchronize is a wait).
    host = sorted(((e.key, e.self_cpu_time_total / 1e3) for e in prof.key_averages()),
                  key=lambda kv: -kv[1])
    print(f"   host, self time: {sum(ms for _, ms in host) / n:.2f} ms/step")
    for name, ms in host[:top]:
        print(f"   {ms / n:8.3f} ms  host  {name[:104]}")
    return k


def launchers(prof: profile, names: list[str], n: int) -> None:
    """For each kernel name, the host code that launched it (ms per step, most first).

    A kernel is linked to the runtime call that queued it (cudaLaunchKernel, cudaMemcpyAsync,
    cudaGraphLaunch); its parents name the op, and with_stack the Python line. Kernels replayed
    from a CUDA graph point at the graph's launch only.
    """
    found: dict[str, dict[str, float]] = {name: defaultdict(float) for name in names}
    for e in prof.events():
        for k in getattr(e, "kernels", []) or []:
            if k.name not in found:
                continue
            chain, p = [], e
            while p is not None and len(chain) < 4:
                chain.append(p.name[:40])
                p = p.cpu_parent
            frames = [f for q in (e, e.cpu_parent) if q is not None for f in (q.stack or [])]
            # the innermost frame (torch's own, e.g. the CUDA-graph runner copying inputs)
            # and the first in pfreeze or transformers (the line of the step that led there)
            ours = next((f for f in frames if "pfreeze" in f or "transformers" in f), "")
            inner = frames[0] if frames else ""
            where = " < ".join(chain) + "".join(f" @ {f}" for f in dict.fromkeys((inner, ours))
                                                if f)
            found[k.name][where] += k.duration / 1e3
    for name, where in found.items():
        if where:
            print(f"   launched: {name[:70]}")
            for w, ms in sorted(where.items(), key=lambda kv: -kv[1])[:3]:
                print(f"      {ms / n:8.3f} ms  {w[:150]}")


def first_sync(fn) -> None:
    """Run fn once with CUDA's sync debug mode raising: print where it first waits, if anywhere."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        print("   no explicit host sync in a step")
    except RuntimeError as e:
        import traceback

        frames = traceback.extract_tb(e.__traceback__)[-6:]
        print(f"   host sync: {e}".splitlines()[0])
        for f in frames:
            print(f"     {f.filename}:{f.lineno} {f.name}: {f.line}")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def profiled(fn, warmup: int, steps: int, cuda: bool, stack: bool = False
             ) -> tuple[profile, float]:
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, with_stack=stack) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
    return prof, wall


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2", choices=SHAPES)
    ap.add_argument("--batch", default="32x512")
    ap.add_argument("--mode", default="default", choices=("default", "reduce-overhead"))
    ap.add_argument("--arms", default="full,frozen,cached")
    # model: the tables in docs/BENCHMARKS.md before session 3 (auto is flash with graphs now)
    ap.add_argument("--attention", default="model", help="training.attention_backend")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--who", action="store_true",
                    help="also name the host code that launched the top kernels (with_stack: "
                         "slower host, so the wall time is not the step's)")
    ap.add_argument("--generate", action="store_true")
    ap.add_argument("--gen-batch", type=int, default=64)
    ap.add_argument("--gen-new", type=int, default=128)
    ap.add_argument("--gen-cache", default="both", choices=("both", "eager", "static", "sampler"),
                    help="generate() with a dynamic or static cache, or pfreeze's sampler")
    return ap.parse_args()


def main() -> None:
    a = parse_args()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    lm = load_model(SHAPES[a.shape], seed=0)
    if a.generate:
        profile_generation(a, lm, dev, cuda)
    else:
        profile_training(a, lm, cuda)


def profile_generation(a: argparse.Namespace, lm: Any, dev: torch.device, cuda: bool) -> None:
    """One generate_samples call per cache kind, per decode step."""
    cfg = GenerationConfig(prompts=[f"{i:08d}" for i in range(8)], decoder="generate",
                           samples_per_prompt=a.gen_batch // 8, max_new_tokens=a.gen_new)
    model = lm.model.to(dev)
    cases = {"eager": [False], "static": [True], "sampler": ["sampler"]}
    for static in cases.get(a.gen_cache, [False, True]):
        c = cfg.model_copy(update={"decoder": "pfreeze"}) if static == "sampler" else cfg
        prof, wall = profiled(lambda c=c, s=static: generate_samples(
            model, lm.tokenizer, c, {0}, dev, cuda, s is True), 2, 1, cuda)
        what = "pfreeze sampler" if static == "sampler" else f"static_cache={static}"
        report(f"generate_samples {what} batch {a.gen_batch}, per decode step", prof, wall,
               a.gen_new, a.top)


def profile_training(a: argparse.Namespace, lm: Any, cuda: bool) -> None:
    """A few steps of each arm's Loop.train_step on the batch stream."""
    b, t = map(int, a.batch.split("x"))
    ids = torch.randint(0, lm.model.config.vocab_size, (ROTATED * b * t,),
                        generator=torch.Generator().manual_seed(0)).tolist()
    for arm in a.arms.split(","):
        cached = arm == "cached"
        loop = pfreeze_loop(lm.model, lm.family, FullArm() if arm == "full" else PlanArm(), b, t,
                            ids, max_steps=1000, bf16=cuda,
                            optim="adamw_fused" if cuda else "adamw", torch_compile=cuda,
                            torch_compile_mode=a.mode, prefix_cache=cached,
                            attention_backend=a.attention)
        r = loop.arms[0]

        def step(r=r, loop=loop) -> None:
            x = loop.stream.next()
            loop.train_step(r, 0, x, loop.stream.windows)
            r.pending.clear()

        prof, wall = profiled(step, a.warmup, a.steps, cuda, a.who)
        k = report(f"{a.shape} {a.batch} {arm} ({a.mode}, attention {a.attention})", prof,
                   wall, a.steps, a.top)
        if a.who:
            launchers(prof, sorted(k, key=lambda name: -k[name])[:a.top], a.steps)
        if cuda:
            first_sync(step)
        del loop, r
        release()


if __name__ == "__main__":
    main()
