"""Host time of one pfreeze training step, apart from its GPU time: is a step host-bound?

    python -m bench.host_time --shape smollm2 --batch 16x256

For the frozen arm (q,k,v of the upper half) uncached and with its prefix cached, compiled
in CUDA graphs, after warm-up: the median host time of BatchStream.next(), of the cache's
lookup (PrefixCache.inputs) and of a whole Loop.train_step (perf_counter around the call,
no sync: the host runs ahead of the GPU), and the median GPU interval between steps (CUDA
events). A step whose host time exceeds its GPU time is host-bound. GPU only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import ROTATED, SHAPES, pfreeze_loop
from pfreeze import PlanArm, load_model, release


def host_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2", choices=SHAPES)
    ap.add_argument("--batch", default="16x256")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    lm = load_model(SHAPES[a.shape], seed=0)
    b, t = map(int, a.batch.split("x"))
    ids = torch.randint(0, lm.model.config.vocab_size, (330_000,),
                        generator=torch.Generator().manual_seed(0)).tolist()
    for cached in (False, True):
        # A short corpus when cached: every chunk is seen (a miss) within the warm-up.
        loop = pfreeze_loop(lm.model, lm.family, PlanArm(), b, t,
                            ids[: ROTATED * b * t] if cached else ids, max_steps=10_000, bf16=True,
                            optim="adamw_fused", torch_compile=True, prefix_cache=cached,
                            attention_backend=a.attention)
        r = loop.arms[0]
        batches = [(loop.stream.next(), loop.stream.windows) for _ in range(ROTATED)]
        for i in range(8):
            loop.train_step(r, i, *batches[i % ROTATED])
        torch.cuda.synchronize()
        nxt = host_ms(loop.stream.next, 200)
        x0, i0 = loop.stage(*batches[0])
        look = (host_ms(lambda p=r.prefix, x=x0, w=batches[0][1], i=i0: p.inputs(x, w, i), 50)
                if cached else 0.0)
        torch.cuda.synchronize()
        ev, host = [], []
        for i in range(a.steps):
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            ev.append(e)
            t0 = time.perf_counter()
            loop.train_step(r, 8 + i, *batches[i % ROTATED])
            host.append(time.perf_counter() - t0)
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        ev.append(e)
        torch.cuda.synchronize()
        gpu = statistics.median(x.elapsed_time(y) for x, y in zip(ev, ev[1:], strict=False))
        print(f"{a.shape} {a.batch} frozen {'cached' if cached else 'uncached'} "
              f"(attention {loop.rt.attention}): step host {statistics.median(host) * 1e3:.2f} ms, "
              f"step interval {gpu:.2f} ms; next() {nxt:.3f} ms; cache lookup {look:.3f} ms",
              flush=True)
        r.pending.clear()
        del loop
        release()


if __name__ == "__main__":
    main()
