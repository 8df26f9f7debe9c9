"""Step and sampling throughput: pfreeze's loop against the loops a reader would write.

One row per shape x batch x arm (full; frozen = q,k,v of the upper half) x method:
    pfreeze           Loop.train_step (autocast, fused AdamW, clip, dW tracker; --pfreeze-compile)
    pfreeze_cached    the same with data.sampling=epochs and the frozen prefix cached (frozen
                      arm only), timed in the steady state: every chunk was seen in warm-up
    eager             plain HF loop: autocast, loss, backward, fused AdamW step, zero_grad
    compiled          the same loop on model.compile(dynamic=False)
    trainer           transformers.Trainer (bf16, adamw_torch_fused), timed by a callback
    trainer_compiled  the same with torch_compile=True
Step times are CUDA-event intervals between step boundaries (no host sync in the loop); the
warm-up steps are reported apart (compilation lands in the first). Rows print as they finish
and --out is rewritten atomically after each: a killed run keeps its rows, and `--resume`
continues the file, measuring only what it lacks (results.py).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bench import results
from bench.common import ARMS, ROTATED, SHAPES, Batches, Row, pfreeze_loop
from bench.flops import model_flops
from bench.inductor import inductor_settings
from bench.sampling import GEN_VARIANTS, run_generation
from pfreeze import (
    FullArm,
    Loop,
    PfreezeError,
    PlanArm,
    compile_plan,
    load_model,
    pick_device,
    release,
)

METHODS = ("pfreeze", "pfreeze_cached", "eager", "compiled", "trainer", "trainer_compiled")
HOPPER_BF16 = 989e12  # dense bf16 FLOP/s of an H100/H200 SXM (datasheet)
LR = 1e-4


class Bench:
    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self.a = args
        self.dev = pick_device(args.device)
        self.cuda = self.dev.type == "cuda"
        self.deadline = time.monotonic() + args.max_seconds
        pc = args.pfreeze_compile = args.pfreeze_compile or ("on" if self.cuda else "off")
        self.pf_compile: bool | str = {"on": True, "off": False}.get(pc, "auto")  # its setting
        # 512 on a GPU: the generation target's batch (a decode step of 64 sequences leaves the
        # H200 idle: 21.7k new tokens/s against 60k+, docs/BENCHMARKS.md session 7); the CPU's
        # tiny model would take minutes at 512
        args.gen_batch = args.gen_batch or (512 if self.cuda else 64)
        name = torch.cuda.get_device_name(self.dev) if self.cuda else "cpu"
        hopper = HOPPER_BF16 if "H100" in name or "H200" in name else None
        self.peak = args.peak_tflops * 1e12 if args.peak_tflops else hopper
        self.env = results.run_environment(self.dev, argv, self.peak)
        self.out: Row = {"environment": self.env, "processes": [], "settings": vars(args),
                         "generation": [], "rows": []}
        if args.resume and (old := results.resumed(args.out, vars(args), self.env)):
            self.out.update(old)
        # This process's index in every row it measures; listed once it has written one.
        self.process = len(self.out["processes"])
        self.out["ratios"] = results.ratios(self.out["rows"])
        done = [r for r in self.out["rows"] if r["status"] == "ok"]
        self.kept = {results.case_key(r) for r in done}
        self.kept_gen = {results.gen_key(r) for r in self.out["generation"]
                         if r["status"] == "ok"}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def mark(self) -> Any:
        """A step boundary: a recorded CUDA event (no host sync) on a GPU, a host time on CPU."""
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def measured(self, marks: list[Any], wall: float) -> Row:
        """Row fields from step-boundary marks (after a sync); `wall`: host s of the timed steps."""
        pairs = zip(marks, marks[1:], strict=False)
        iv = [b - a if isinstance(a, float) else a.elapsed_time(b) / 1e3 for a, b in pairs]
        warm, times = iv[: self.a.warmup], iv[self.a.warmup :]
        peak = torch.cuda.max_memory_allocated(self.dev) / 2**20 if self.cuda else None
        # CUDA-graph pools are reserved in warm-up, outside the allocated peak: report both.
        held = torch.cuda.max_memory_reserved(self.dev) / 2**20 if self.cuda else None
        return {"step_ms": statistics.median(times) * 1e3, "step_ms_mean": wall / len(times) * 1e3,
                "peak_mib": peak, "reserved_mib": held, "first_step_s": warm[0] if warm else None,
                "warmup_s": sum(warm), "step_ms_all": [round(s * 1e3, 3) for s in times]}

    def start_timed(self) -> float:
        """Between warm-up and timed steps: drain the queue, reset the peak, read the clock."""
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.dev)
        return time.perf_counter()

    def drive(self, step: Callable[[int], None]) -> Row:
        marks, w = [], self.a.warmup
        for i in range(w):
            marks.append(self.mark())
            step(i)
        t0 = self.start_timed()
        with results.host_syncs(self.cuda) as sites:
            for i in range(w, w + self.a.steps):
                marks.append(self.mark())
                step(i)
            marks.append(self.mark())
        self.sync()
        return {**self.measured(marks, time.perf_counter() - t0), "host_syncs": len(sites),
                "sync_sites": sorted(set(sites))[:5]}

    def autocast(self, on: bool = True) -> torch.autocast:
        return torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=on and self.cuda)

    def m_pfreeze(self, base: nn.Module, family: str, arm: str, batches: Batches,
                  cached: bool = False) -> Row:
        b, seq = batches[0].shape
        arm_cfg = FullArm() if ARMS[arm] is None else PlanArm(select=ARMS[arm])
        # Cached: the batches' tokens as the corpus, so one epoch = len(batches) steps.
        ids = torch.cat(batches).flatten().tolist() if cached else None
        loop = pfreeze_loop(base, family, arm_cfg, b, seq, ids, learning_rate=LR,
                            max_steps=self.a.warmup + self.a.steps,
                            bf16=self.cuda or "auto", device=self.dev.type,
                            torch_compile=self.pf_compile,
                            torch_compile_mode=self.a.pfreeze_compile_mode,
                            optim="adamw_fused" if self.cuda else "adamw", prefix_cache=cached,
                            attention_backend=self.a.pfreeze_attention)
        r = loop.arms[0]
        if cached:  # one epoch drawn up front (every chunk once), as other rows' batches are
            pairs = [(loop.stream.next(), loop.stream.windows) for _ in batches]
            m = self.drive(lambda i: loop.train_step(r, i, *pairs[i % len(pairs)]))
            m["prefix_cache"] = r.prefix_summary()
        else:
            m = self.drive(lambda i: loop.train_step(r, i, batches[i % len(batches)]))
        # Each step resets the device's peak, so the row's peak is the most any step recorded
        # (the device's counter alone would say the last step's). Warm-up steps count: a step
        # replayed from a CUDA graph allocates nothing (its activations and gradients live in
        # the graph's pool, allocated while it was recorded in warm-up), so the timed steps
        # alone would report only the weights and optimizer state.
        if self.cuda and r.pending:
            m["peak_mib"] = max(rec.mem_mb for rec in r.pending)
            m["reserved_mib"] = max(rec.reserved_mb for rec in r.pending)
        r.pending.clear()  # queued losses, norms and events are not read here
        return {**m, **resolved(loop)}

    def m_plain(self, model: nn.Module, batches: Batches, compiled: bool) -> Row:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=self.cuda or None)
        if compiled:
            model.compile(dynamic=False)

        def step(i: int) -> None:
            x = batches[i % len(batches)].to(self.dev, non_blocking=True)
            with self.autocast():
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return self.drive(step)

    def m_trainer(self, model: nn.Module, batches: Batches, compiled: bool) -> Row:
        from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
        from transformers import default_data_collator as collate

        warmup, last, bench = self.a.warmup, self.a.warmup + self.a.steps, self
        marks, host = list[Any](), list[float]()

        class Timer(TrainerCallback):
            # global_step is k at the start of 0-based step k, and k+1 at its end.
            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if state.global_step == warmup:
                    host.append(bench.start_timed())
                marks.append(bench.mark())

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if state.global_step == last:
                    marks.append(bench.mark())
                    bench.sync()
                    host.append(time.perf_counter())

        # A map-style dataset long enough that the run stays within one epoch.
        rows = [{"input_ids": x, "labels": x} for x in torch.cat(batches)] * (last + 1)
        with tempfile.TemporaryDirectory() as tmp:
            targs = TrainingArguments(
                output_dir=tmp, max_steps=last, per_device_train_batch_size=len(batches[0]),
                learning_rate=LR, bf16=self.cuda, torch_compile=compiled,
                optim="adamw_torch_fused" if self.cuda else "adamw_torch",
                save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
                dataloader_num_workers=0, use_cpu=not self.cuda, seed=self.a.seed)
            trainer = Trainer(model=model, args=targs, data_collator=collate,
                              train_dataset=rows, callbacks=[Timer()])
            trainer.remove_callback(PrinterCallback)  # disable_tqdm adds it: no metrics dict
            trainer.train()
            trainer.accelerator.free_memory()
        return self.measured(marks, host[1] - host[0])

    def guarded(self, row: Row, need: float, fn: Callable[[], Row]) -> None:
        """Fill `row` from fn(), or skip it (< `need` s left), or keep its error (OOM, API)."""
        if self.deadline - time.monotonic() < need:
            row["status"] = "skipped"
            return
        try:
            row.update(status="ok", **fn())
        except Exception as e:
            traceback.print_exc(limit=3, file=sys.stderr)
            row.update(status="error", error=f"{type(e).__name__}: {e}"[:600])
        finally:  # free this case's models; a fresh model must not meet dynamo's recompile limit
            release()

    def run_case(self, method: str, arm: str, base: nn.Module, family: str, batches: Batches
                 ) -> Row:
        names = {n for n, _ in base.named_parameters()}
        if (select := ARMS[arm]) is not None:
            plan = compile_plan(base, family, select)
            if any(tp.mask is not None for tp in plan.tensors.values()):
                raise ValueError(f"'{select}' trains parts of tensors: only pfreeze can run it")
            names = set(plan.tensors)
        b, t = batches[0].shape
        flops = model_flops(base, family, names, b, t)
        if method.startswith("pfreeze"):
            m = self.m_pfreeze(base, family, arm, batches, cached=method == "pfreeze_cached")
        else:
            model = copy.deepcopy(base).to(self.dev).train()
            for n, p in model.named_parameters():
                p.requires_grad_(n in names)
            run = self.m_plain if method in ("eager", "compiled") else self.m_trainer
            m = run(model, batches, compiled=method.endswith("compiled"))
            del model
        secs = m["step_ms"] / 1e3
        # A cached step skips the prefix's forward: `mfu` counts the training the arm does
        # (comparable across methods), `mfu_executed` only the FLOPs the GPU ran.
        done = (model_flops(base, family, names, b, t, cached=True)
                if method == "pfreeze_cached" else flops)
        return {"trainable_params": sum(base.get_parameter(n).numel() for n in names),
                "tokens_per_s": b * t / secs, "flops_per_step": flops,
                "flops_executed_per_step": done,
                "mfu": flops / secs / self.peak if self.peak else None,
                "mfu_executed": done / secs / self.peak if self.peak else None, **m}

    def cases(self, shape: str) -> list[Row]:
        """The rows still to measure for `shape`, in order."""
        out = []
        for b, t in (map(int, s.split("x")) for s in self.a.batches.split(",")):
            for method in self.a.methods:
                for arm in self.a.arms:
                    if method == "pfreeze_cached" and ARMS[arm] is None:
                        continue  # the full arm trains block 0: nothing to cache
                    row = {"shape": shape, "batch": b, "seq": t, "arm": arm, "method": method,
                           "process": self.process}
                    if results.case_key(row) not in self.kept:
                        out.append(row)
        return out

    def run_shape(self, shape: str) -> None:
        if not (todo := self.cases(shape)):
            return
        lm = load_model(SHAPES.get(shape, shape), seed=self.a.seed, dtype=self.a.dtype)
        size, batches = None, []
        for row in todo:
            b, t, method, arm = row["batch"], row["seq"], row["method"], row["arm"]
            if size != (b, t):
                size, g = (b, t), torch.Generator().manual_seed(self.a.seed)
                batches = [torch.randint(0, lm.model.config.vocab_size, (b, t), generator=g)
                           for _ in range(ROTATED)]  # the peers' input, pinned once up front
                batches = [x.pin_memory() for x in batches] if self.cuda else batches
            pf = method.startswith("pfreeze") and self.pf_compile is True
            need = self.a.compile_reserve if pf or method.endswith("compiled") else 15
            row["model"] = lm.name
            self.guarded(row, need, lambda m=method, a=arm: self.run_case(
                m, a, lm.model, lm.family, batches))  # noqa: B023 (called at once)
            results.replace_row(self.out["rows"], row, results.case_key)
            print(results.line(row), flush=True)
            self.write()

    def measured_nothing(self) -> bool:
        return len(self.out["processes"]) == self.process

    def write(self) -> None:
        if self.measured_nothing():
            self.out["processes"].append(self.env)
        self.out["ratios"] = results.ratios(self.out["rows"])
        results.write_json(self.a.out, self.out)


def resolved(loop: Loop) -> Row:
    """What auto resolved to, per row (the settings only say "auto"), as summary.json reports
    it: the attention kernel, and the compile mode of a compiled step (None: eager)."""
    return {"attention": loop.rt.attention,
            "compile_mode": loop.rt.compile_mode if loop.rt.compiled else None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="smollm2,gpt2", help=f"of {', '.join(SHAPES)}")
    p.add_argument("--batches", default="32x512,16x256", help="BATCHxSEQ,...")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list, or none")
    p.add_argument("--steps", type=int, default=20, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=5, help="steps before them, timed apart")
    p.add_argument("--pfreeze-compile", choices=("auto", "on", "off"), help="default: on if CUDA")
    p.add_argument("--pfreeze-compile-mode", default="auto",
                   choices=("auto", "default", "reduce-overhead", "max-autotune"))
    p.add_argument("--pfreeze-attention", default="auto",
                   choices=("auto", "model", "flash", "sdpa", "cudnn", "efficient", "math"))
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="a torch._inductor.config setting for every compiled case (repeatable)")
    p.add_argument("--peak-tflops", type=float, help="for MFU (default: 989 on H100/H200)")
    p.add_argument("--gen", action=argparse.BooleanOptionalAction, default=True, help="runs first")
    p.add_argument("--arms", default="full,frozen", help=f"of {', '.join(ARMS)}")
    p.add_argument("--gen-shape", help="default: smollm2 on CUDA, tiny on CPU")
    p.add_argument("--gen-variants", default=",".join(GEN_VARIANTS), help="comma list")
    p.add_argument("--gen-batch", type=int, help="default: 512 on CUDA, 64 on CPU")
    for name, default in (("prompt", 8), ("new", 128), ("warmup", 2), ("reps", 3)):
        p.add_argument(f"--gen-{name}", type=int, default=default)
    p.add_argument("--max-seconds", type=float, default=540, help="then skip what is left")
    p.add_argument("--compile-reserve", type=float, default=100, help="to start a compile")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="weight storage (model.dtype); trained tensors keep fp32 masters")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-results.json")
    p.add_argument("--resume", action="store_true",
                   help="continue --out: keep its finished rows, measure the rest")
    args = p.parse_args(argv)
    once = lambda spec: list(dict.fromkeys(x for x in spec.split(",") if x))  # noqa: E731
    args.methods = [m for m in once(args.methods) if m != "none"]
    args.arms, args.gen_variants = once(args.arms), once(args.gen_variants)
    args.shapes, args.batches = ",".join(once(args.shapes)), ",".join(once(args.batches))
    try:  # resolved here: the file records (and --resume compares) the typed settings
        args.inductor = inductor_settings(args.inductor)
    except PfreezeError as e:
        p.error(str(e))
    if "pfreeze_cached" in args.methods and args.warmup < ROTATED:
        p.error(f"pfreeze_cached needs --warmup {ROTATED} or more: the warm-up must see every "
                f"one of the {ROTATED} rotated batches once, so that the timed steps hit the cache")
    for what, got, known in (("method", args.methods, METHODS), ("arm", args.arms, ARMS),
                             ("generation variant", args.gen_variants, GEN_VARIANTS)):
        if bad := set(got) - set(known):
            p.error(f"unknown {what}(s) {sorted(bad)}; choose from {', '.join(known)}")
    return args


def main(argv: list[str] | None = None) -> Row:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    with torch._inductor.config.patch(args.inductor):
        return run(Bench(args, argv))


def run(bench: Bench) -> Row:
    for text in results.kept_lines(bench.out, "generation"):
        print(text, flush=True)
    if bench.a.gen:  # first: it is short, and a time-bounded call should not lose it
        run_generation(bench)
    print(results.HEADER if bench.a.methods else "", flush=True)
    for text in results.kept_lines(bench.out, "rows"):
        print(text, flush=True)
    for shape in bench.a.shapes.split(",") if bench.a.methods else []:
        bench.run_shape(shape)
    if bench.measured_nothing() and bench.process:  # a resumed file stays as it was
        print(f"nothing left to measure in {bench.a.out}", flush=True)
    elif bench.measured_nothing():
        bench.write()  # an empty file rather than none: the command ran
    for r in bench.out["ratios"]:
        print(results.ratio_line(r), flush=True)
    return bench.out

