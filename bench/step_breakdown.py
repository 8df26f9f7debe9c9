"""Where one pfreeze training step spends its time, phase by phase, on the GPU.

    python -m bench.step_breakdown --shape smollm2 --batch 16x256 [--compile]

Runs Loop.train_step's phases by hand (forward+backward of the loss alone, as the loop's
execution.LossOf returns it; grad masking + clipping; optimizer; restore of frozen elements;
ΔW tracker) with CUDA events between them, after warm-up, and prints median milliseconds of
each phase plus the host time of the whole step (how long Python takes to *enqueue* it): when
host time ≥ GPU time the step is launch-bound and only fewer launches (CUDA graphs) help.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import SHAPES, pfreeze_loop
from pfreeze import FullArm, LossOf, PlanArm, load_model, release, training_attention


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2", choices=SHAPES)
    ap.add_argument("--batch", default="16x256")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    # Defaults: the settings of the tables in docs/BENCHMARKS.md (no CUDA graphs, the model's
    # attention); --mode reduce-overhead --attention flash are pfreeze's GPU defaults.
    ap.add_argument("--mode", default="default")
    ap.add_argument("--attention", default="model")
    a = ap.parse_args()
    b, t = map(int, a.batch.split("x"))
    lm = load_model(SHAPES[a.shape])
    for arm in (FullArm(), PlanArm()):
        loop = pfreeze_loop(lm.model, lm.family, arm, b, t, max_steps=1000, bf16=True,
                            optim="adamw_fused", torch_compile=a.compile,
                            torch_compile_mode=a.mode, attention_backend=a.attention)
        r = loop.arms[0]
        fwd = LossOf(r.step_model) if r.step_fn is None else r.step_fn
        x = torch.randint(0, lm.model.config.vocab_size, (b, t), device="cuda")
        params = r.freezer.trainable()
        phases: dict[str, list[float]] = {k: [] for k in ("fwd+bwd", "mask+clip", "optim",
                                                             "restore", "tracker", "total")}
        host: list[float] = []
        for i in range(a.steps + 5):
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(6)]
            h0 = time.perf_counter()
            ev[0].record()
            with (torch.autocast(loop.device.type, torch.bfloat16),
                  training_attention(r.model, loop.rt.attention)):
                loss = fwd(input_ids=x, labels=x, use_cache=False)
            loss.backward()
            ev[1].record()
            r.freezer.mask_grads()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            ev[2].record()
            r.optimizer.step()
            r.optimizer.zero_grad(set_to_none=True)
            ev[3].record()
            r.freezer.restore()
            ev[4].record()
            r.tracker.step()
            ev[5].record()
            host.append(time.perf_counter() - h0)
            torch.cuda.synchronize()
            if i >= 5:
                for k, (s, e) in zip(list(phases)[:5], zip(ev[:5], ev[1:], strict=True),
                                     strict=True):
                    phases[k].append(s.elapsed_time(e))
                phases["total"].append(ev[0].elapsed_time(ev[5]))
        name = "full" if isinstance(arm, FullArm) else "frozen"
        cells = "  ".join(f"{k} {statistics.median(v):7.2f}" for k, v in phases.items())
        print(f"{a.shape} {a.batch} {name:6s} compile={a.compile}  GPU ms: {cells}  "
              f"host enqueue ms {1000 * statistics.median(host[5:]):7.2f}", flush=True)
        del loop, r
        release()


if __name__ == "__main__":
    main()
