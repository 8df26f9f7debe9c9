"""Real sizes side by side: one `pfreeze run` (θ₀ loaded once, its arms together on one
device, the identical batch stream) at a Llama-3.x shape, with random-init weights.

    python -m bench.real_sizes --case 8b-two-plans --out docs/bench-results/real-8b.json

Per arm it reports what the run's summary measured (median step, tokens/s, the run's peak
allocated and reserved memory), the MFU of that step (bench.flops: the training the arm does,
under the dense bf16 peak of the card), and the memory plan's estimate (the plan pfreeze makes
before anything loads) against the measured peak. With the arms together, the device's peak
is every arm's weights plus the largest step: it is compared with the plan's `together` total.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

import torch

from bench.common import ARMS, Row
from bench.flops import model_flops
from bench.results import run_environment, write_json
from pfreeze import compile_plan, describe_params, first_trained_block, meta_of

QKV_UPPER = {"kind": "plan", "name": "qkv-upper", "select": ARMS["frozen"]}
CASES: dict[str, Row] = {
    # Two arms that train the same matrices of an 8B model (q, k, v of the upper half), whole
    # and by LoRA, side by side in bf16 storage: the frozen tensors cost their checkpoint's
    # bytes (15 GiB, held once for both arms), the trained ones keep fp32 masters.
    "8b-two-plans": {"model": "random:llama-3.1-8b", "dtype": "bfloat16", "batch": 4,
                     "seq": 2048, "arms": [QKV_UPPER, {"kind": "lora", "name": "lora-upper",
                                                       "select": ARMS["frozen"]}]},
    # The pair measured at 604ce3e (docs/BENCHMARKS.md): LoRA on q, k, v of every block.
    "8b-two-plans-s10": {"model": "random:llama-3.1-8b", "dtype": "bfloat16", "batch": 4,
                         "seq": 2048, "arms": [QKV_UPPER, {"kind": "lora", "name": "lora"}]},
    "1b-full-and-frozen": {"model": "random:llama-3.2-1b", "dtype": "bfloat16", "batch": 8,
                           "seq": 2048, "arms": [{"kind": "full", "name": "full"}, QKV_UPPER]},
}


def config(case: Row, corpus: str, steps: int, checkpointing: bool,
           compile_: bool | str = True) -> dict[str, Any]:
    """The run's config: timing steps only (one small evaluation, one short sample)."""
    return {
        "model": {"name": case["model"], "dtype": case["dtype"]},
        "data": {"corpus": corpus, "block_size": case["seq"]},
        "training": {"per_device_train_batch_size": case["batch"], "max_steps": steps,
                     "learning_rate": 1e-4, "optim": "adamw_fused", "bf16": True,
                     "device": "cuda", "eval_steps": steps, "eval_batches": 1,
                     "logging_steps": 10, "gradient_checkpointing": checkpointing,
                     # auto compiles runs of 1000 steps or more only: a timed run says on
                     "torch_compile": compile_},
        "generation": {"prompts": ["Call me"], "samples_per_prompt": 1, "max_new_tokens": 8,
                       "decoder": "generate"},
        "arms": case["arms"],
    }


def arm_flops(model_name: str, arm: Row, batch: int, seq: int) -> float:
    """Model FLOPs of one step of `arm` (a LoRA arm: backward from its lowest adapted block)."""
    meta, family = meta_of(model_name)
    if arm["kind"] == "full":
        return model_flops(meta, family, {n for n, _ in meta.named_parameters()}, batch, seq)
    select = arm.get("select", "roles=q,k,v") if arm["kind"] == "lora" else arm["select"]
    names = set(compile_plan(meta, family, select).tensors)
    if arm["kind"] == "lora":
        lowest = first_trained_block(names, describe_params(meta, family),
                                     meta.config.num_hidden_layers)
        return model_flops(meta, family, set(), batch, seq, adapters_from=lowest)
    return model_flops(meta, family, names, batch, seq)


def _run_echoed(cmd: list[str]) -> tuple[int, str]:
    """Run `cmd`, passing its stderr through as it comes; its exit code and last lines."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    tail: deque[str] = deque(maxlen=20)
    for line in proc.stderr or []:
        sys.stderr.write(line)
        tail.append(line)
    return proc.wait(), "".join(tail)


def measure(case_name: str, corpus: str, steps: int, checkpointing: bool, peak: float,
            compile_: bool | str = True) -> Row:
    case = CASES[case_name]
    raw = config(case, corpus, steps, checkpointing, compile_)
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "config.yaml"
        cfg_path.write_text(json.dumps(raw))  # JSON is YAML
        # The command a user types, in its own process: the card holds only this run.
        cmd = [sys.executable, "-m", "pfreeze.cli", "run", "-c", str(cfg_path),
               "--output-dir", str(Path(tmp) / "run")]
        rc, said = _run_echoed(cmd)
        if rc == 2 and "MiB free" in said and not checkpointing:
            # The plan said the arms cannot fit (its line is printed): the knob it names.
            # Any other one-line error (a corpus path) is not retried.
            return measure(case_name, corpus, steps, True, peak, compile_)
        if rc:
            raise SystemExit(f"pfreeze run exited {rc}")
        summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
    plan = summary["memory_plan"]
    estimate = {r["arm"]: r for r in plan["arms"]}
    arms = {}
    for acfg in case["arms"]:
        a = summary["arms"][acfg["name"]]
        flops = arm_flops(case["model"], acfg, case["batch"], case["seq"])
        step = a["median_step_time_s"]
        arms[acfg["name"]] = {
            "median_step_s": step, "tokens_per_s": a["tokens_per_s"],
            "mfu": flops / step / peak if step else None, "flops_per_step": flops,
            "peak_allocated_mib": a["peak_mem_mb"], "peak_reserved_mib": a["peak_reserved_mb"],
            "plan_total_mib": estimate[acfg["name"]]["total_mib"],
            "plan_weights_mib": estimate[acfg["name"]]["weights_mib"],
            "trainable_params": a["trainable_params"], "first_step_s": a["first_step_time_s"]}
    # Together, each arm's peak holds every arm's weights: the plan's `together` is the
    # figure to check. One at a time, each arm's peak is its own: checked arm by arm.
    together = summary["execution"]["arms_placement"] == "together"
    for a in arms.values():
        a["plan_error"] = (None if together or not a["peak_allocated_mib"] else
                           a["plan_total_mib"] / a["peak_allocated_mib"] - 1)
    measured = max(a["peak_allocated_mib"] or 0 for a in arms.values())
    return {"case": case_name, "config": raw, "arms": arms,
            "plan_together_mib": plan["together_mib"], "measured_peak_mib": measured,
            "plan_error": (plan["together_mib"] / measured - 1 if together and measured
                           else None),
            "placement": summary["execution"]["arms_placement"],
            "gradient_checkpointing": checkpointing,
            "gpu_reserved_peak_mib": summary["execution"]["gpu_reserved_peak_mb"],
            "free_mib": plan["free_mib"]}


def main(argv: list[str] | None = None) -> Row:
    p = argparse.ArgumentParser(prog="python -m bench.real_sizes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", action="append", choices=sorted(CASES), required=True)
    p.add_argument("--corpus", default="../shared/data/moby-dick/pg2701.txt")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--torch-compile", choices=("on", "off", "auto"), default="on",
                   help="training.torch_compile (auto: eager under 1000 steps)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 (H100/H200)")
    p.add_argument("--out", default="real-sizes.json")
    a = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: Row = {"environment": run_environment(dev, argv or sys.argv[1:], a.peak_tflops * 1e12,
                                              "bench.real_sizes"),
                "rows": []}
    for name in a.case:
        row = measure(name, a.corpus, a.steps, a.gradient_checkpointing, a.peak_tflops * 1e12,
                      {"on": True, "off": False}.get(a.torch_compile, "auto"))
        out["rows"].append(row)
        write_json(a.out, out)
        print(json.dumps(row["arms"], indent=1), f"plan together {row['plan_together_mib']} "
              f"MiB, measured {row['measured_peak_mib']} MiB", flush=True)
    return out


if __name__ == "__main__":
    main()
