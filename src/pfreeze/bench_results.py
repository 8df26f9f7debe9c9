"""The benchmark's results: one JSON file and one printed table, the ratios between rows, and
continuing an earlier results file (`--resume`).

A resumed file keeps the rows that finished and measures only the cases still missing (or
skipped, or failed), so a benchmark larger than one sitting on a machine (the default matrix
takes longer than a 10-minute slot on a lent GPU) still ends as one file. Each row names the
process that measured it (`process`: an index into `processes`); rows of different processes
are comparable only on the same device and software, which resuming checks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from pfreeze.outputs import environment

Row = dict[str, Any]  # one JSON row or result

# What a row's figure depends on besides its case: a file is continued only with the same.
SAME_SETTINGS = ("steps", "warmup", "pfreeze_compile", "pfreeze_compile_mode",
                 "pfreeze_attention", "peak_tflops", "device", "seed", "gen_shape",
                 "gen_batch", "gen_prompt", "gen_new", "gen_warmup", "gen_reps")
SAME_ENVIRONMENT = ("device_name", "torch", "transformers")

HEADER = ("shape    batch    arm    method             step ms      tok/s    MFU  peak MiB"
          "  rsv MiB  warm s")


def case_key(r: Row) -> tuple[Any, ...]:
    return (r["shape"], r["batch"], r["seq"], r["arm"], r["method"])


def gen_key(r: Row) -> tuple[Any, ...]:
    return (r["variant"], r["shape"], r["batch"], r["prompt_tokens"], r["new_tokens"])


def run_environment(device: torch.device, argv: list[str], peak: float | None) -> Row:
    env = environment(device)  # the same probe every run's summary.json records
    return {**env, "git": env.pop("git_hash"), "cuda": torch.version.cuda,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(["python", "-m", "pfreeze.bench", *argv]), "peak_flops": peak}


def resumed(path: str | Path, settings: Row, env: Row) -> Row | None:
    """The earlier results at `path` to continue, with only their finished rows; None if there
    is no such file. A file measured with other settings, or elsewhere, is refused."""
    try:
        old = json.loads(Path(path).read_text(encoding="utf-8"))
        rows, gens, was = old["rows"], old["generation"], old["settings"]
        processes = old.get("processes") or [old["environment"]]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: cannot resume {path}: not a pfreeze.bench results file "
                         f"({type(e).__name__}: {e}); pass another --out, or delete it") from None
    for k in SAME_SETTINGS:
        if was.get(k) != settings.get(k):
            raise SystemExit(f"error: cannot resume {path}: it was measured with {k}="
                             f"{was.get(k)!r}, this run has {settings.get(k)!r}; rerun with the "
                             "same setting, or pass another --out")
    for k in SAME_ENVIRONMENT:
        if processes[-1].get(k) != env.get(k):
            raise SystemExit(f"error: cannot resume {path}: it was measured with {k} "
                             f"{processes[-1].get(k)!r}, this machine has {env.get(k)!r}; "
                             "its rows would not compare: pass another --out")
    keep = [dict(r, process=r.get("process", 0)) for r in rows if r.get("status") == "ok"]
    gkeep = [dict(r, process=r.get("process", 0)) for r in gens if r.get("status") == "ok"]
    return {"processes": processes, "rows": keep, "generation": gkeep}


def ratios(rows: list[Row]) -> list[Row]:
    """pfreeze (and pfreeze_cached) / peer step time per (shape, batch, arm); frozen / full per
    method (pfreeze_cached's frozen arm against pfreeze's full arm, which it cannot cache)."""
    ok = {case_key(r): r["step_ms"] for r in rows if r.get("status") == "ok"}
    out = []
    for (s, b, t, arm, meth), ms in ok.items():
        case = {"shape": s, "batch": b, "seq": t, "method": meth}
        if not meth.startswith("pfreeze"):
            for own in ("pfreeze", "pfreeze_cached"):
                if pf := ok.get((s, b, t, arm, own)):
                    out.append({"kind": f"{own}/peer", **case, "arm": arm,
                                "step_time_ratio": pf / ms})
        full = ok.get((s, b, t, "full", "pfreeze" if meth == "pfreeze_cached" else meth))
        if arm == "frozen" and full:
            out.append({"kind": "frozen/full", **case, "arm": "", "step_time_ratio": ms / full})
    return out


def line(r: Row) -> str:
    """One table line per case, under HEADER."""
    bt = f"{r['batch']}x{r['seq']}"
    head = f"{r['shape']:8} {bt:8} {r['arm']:6} {r['method']:16}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r.get('error', '')}"
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
    mem, rsv = (f"{r[k]:.0f}" if r.get(k) is not None else "-"
                for k in ("peak_mib", "reserved_mib"))
    syncs = f"  host syncs {r['host_syncs']}" if r.get("host_syncs") else ""
    ran = r.get("mfu_executed")
    done = f"  MFU {ran:.1%} of FLOPs run" if ran is not None and ran != r["mfu"] else ""
    return (f"{head} {r['step_ms']:9.1f} {r['tokens_per_s']:10,.0f} {mfu:>6} {mem:>9}"
            f" {rsv:>8} {r['warmup_s']:7.1f}  ok{syncs}{done}")


def ratio_line(r: Row) -> str:
    return (f"{r['kind']:20} {r['shape']:8} {r['batch']}x{r['seq']:<5} {r['arm']:6} "
            f"{r['method']:16} {r['step_time_ratio']:.3f}")
