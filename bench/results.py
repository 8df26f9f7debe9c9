"""The benchmark's results: one JSON file and one printed table, the ratios between rows, the
host syncs a row reports, and continuing an earlier results file (`--resume`).

A resumed file keeps the rows that finished and measures only the cases still missing (or
skipped, or failed), so a benchmark larger than one sitting on a machine (the default matrix
takes longer than a 10-minute slot on a lent GPU) still ends as one file. Each row names the
process that measured it (`process`: an index into `processes`); rows of different processes
are comparable only on the same device and software, which resuming checks.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from bench.common import Row
from pfreeze import environment

# What a row's figure depends on besides its case (shape, batch, arm, method; generation's
# variant, shape, batch, lengths): a file is continued only with the same. `pfreeze_compile`
# is compared as resolved (on/off/auto), the device by its kind and name below.
SAME_SETTINGS = ("steps", "warmup", "pfreeze_compile", "pfreeze_compile_mode",
                 "pfreeze_attention", "inductor", "seed", "gen_warmup", "gen_reps")
SAME_ENVIRONMENT = ("device", "device_name", "peak_flops", "torch", "transformers")


@contextmanager
def host_syncs(cuda: bool) -> Iterator[list[str]]:
    """The places (file:line) where code inside made the host wait for the GPU, by CUDA's sync
    debug mode (filled on exit). It sees device and stream synchronisation and blocking
    copies (.item(), bool(), .cpu()); not event waits (Staging's ring waits so, on copies
    queued steps ago) nor a driver's implicit wait (a copy from pageable memory). Torch's
    own caveat: the mode does not yet see every synchronising operation."""
    sites: list[str] = []
    if not cuda:
        yield sites
        return
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            torch.cuda.set_sync_debug_mode(before)
    sites += sync_sites(caught)


def sync_sites(caught: list[warnings.WarningMessage]) -> list[str]:
    """file:line of each sync warning in `caught`; other warnings are re-raised. The mode's
    own notice ("... prototype feature and does not yet detect all synchronizing
    operations", once per process) is dropped: it is not a sync (the first row of every
    session-5 bench run counted it as one)."""
    sites = []
    for c in caught:
        if "called a synchronizing" in str(c.message):
            sites.append(f"{'/'.join(Path(c.filename).parts[-3:])}:{c.lineno}")
        elif "debug mode is a prototype feature" in str(c.message):
            continue  # we turned the mode on: its caveat is in host_syncs' docstring
        else:  # not ours to swallow
            warnings.warn_explicit(c.message, c.category, c.filename, c.lineno)
    return sites


HEADER = ("shape    batch    arm    method             step ms      tok/s    MFU  peak MiB"
          "  rsv MiB  warm s")


def case_key(r: Row) -> tuple[Any, ...]:
    return (r["shape"], r["batch"], r["seq"], r["arm"], r["method"])


def gen_key(r: Row) -> tuple[Any, ...]:
    return (r["variant"], r["shape"], r["batch"], r["prompt_tokens"], r["new_tokens"])


def run_environment(device: torch.device, argv: list[str], peak: float | None,
                    module: str = "bench") -> Row:
    """The card, software and commit, and the command line as typed (`python -m <module>`)."""
    env = environment(device)  # the same probe every run's summary.json records
    return {**env, "git": env["git_hash"], "cuda": torch.version.cuda,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(["python", "-m", module, *argv]), "peak_flops": peak}


def resumed(path: str | Path, settings: Row, env: Row) -> Row | None:
    """The earlier results at `path` to continue (rows that did not finish stay, marked, until
    their case is measured again); None if there is no such file. A file measured on another
    kind of device or software, or with other settings, is refused; one measured at another
    commit is continued with a warning (each row names its process, each process its commit)."""
    try:
        old = json.loads(Path(path).read_text(encoding="utf-8"))
        rows, gens, was = list(old["rows"]), list(old["generation"]), dict(old["settings"])
        processes = list(old.get("processes") or [old["environment"]])
        last = dict(processes[-1])
        for r in rows:
            case_key(r)
        for r in gens:
            gen_key(r)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: cannot resume {path}: not a pfreeze bench results file "
                         f"({type(e).__name__}: {e}); pass another --out, or delete it") from None
    for k in SAME_ENVIRONMENT:
        if last.get(k) != env.get(k):
            raise SystemExit(f"error: cannot resume {path}: it was measured with {k} "
                             f"{last.get(k)!r}, this machine has {env.get(k)!r}; its rows "
                             "would not compare with this machine's: pass another --out")
    for k in SAME_SETTINGS:
        if k not in was:
            raise SystemExit(f"error: cannot resume {path}: it predates the setting {k}; "
                             "pass another --out")
        if was[k] != settings.get(k):
            raise SystemExit(f"error: cannot resume {path}: it was measured with {k}="
                             f"{was[k]!r}, this run has {settings.get(k)!r}; rerun with the "
                             "same setting, or pass another --out")
    if last.get("git") != env.get("git"):
        print(f"warning: {path} was measured at {last.get('git')}, this run is at "
              f"{env.get('git')}: rows and ratios across the two compare two commits",
              file=sys.stderr)
    return {"processes": processes,
            "rows": [dict(r, process=r.get("process", 0)) for r in rows],
            "generation": [dict(r, process=r.get("process", 0)) for r in gens]}


def write_json(path: str | Path, obj: Row) -> None:
    """`obj` as JSON at `path`, atomically: a killed run leaves the previous file, not half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(obj, indent=2, default=str) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_row(rows: list[Row], row: Row, key: Any) -> None:
    """Append `row`, dropping an unfinished row of the same case (kept from a resumed file)."""
    rows[:] = [r for r in rows if key(r) != key(row)]
    rows.append(row)


def ratios(rows: list[Row]) -> list[Row]:
    """pfreeze (and pfreeze_cached) / peer step time per (shape, batch, arm); frozen / full per
    method (pfreeze_cached's frozen arm against pfreeze's full arm, which it cannot cache)."""
    ok = {case_key(r): r for r in rows if r.get("status") == "ok"}
    out = []

    def pair(kind: str, case: Row, num: Row, den: Row) -> None:
        # The processes that measured the two rows: a resumed file can pair two runs.
        out.append({"kind": kind, **case, "step_time_ratio": num["step_ms"] / den["step_ms"],
                    "processes": sorted({num["process"], den["process"]})})

    for (s, b, t, arm, meth), r in ok.items():
        case = {"shape": s, "batch": b, "seq": t, "method": meth}
        if not meth.startswith("pfreeze"):
            for own in ("pfreeze", "pfreeze_cached"):
                if pf := ok.get((s, b, t, arm, own)):
                    pair(f"{own}/peer", {**case, "arm": arm}, pf, r)
        full = ok.get((s, b, t, "full", "pfreeze" if meth == "pfreeze_cached" else meth))
        if arm == "frozen" and full:
            pair("frozen/full", {**case, "arm": ""}, r, full)
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
    skips = r.get("flops_executed_per_step") not in (None, r.get("flops_per_step"))
    done = f"  MFU {ran:.1%} of FLOPs run" if ran is not None and skips else ""
    return (f"{head} {r['step_ms']:9.1f} {r['tokens_per_s']:10,.0f} {mfu:>6} {mem:>9}"
            f" {rsv:>8} {r['warmup_s']:7.1f}  ok{syncs}{done}")


def ratio_line(r: Row) -> str:
    across = f"  (processes {r['processes']})" if len(r["processes"]) > 1 else ""
    return (f"{r['kind']:20} {r['shape']:8} {r['batch']}x{r['seq']:<5} {r['arm']:6} "
            f"{r['method']:16} {r['step_time_ratio']:.3f}{across}")


def kept_lines(out: Row, part: str) -> list[str]:
    """Table lines of the finished rows a resumed file brought (`part`: rows or generation)."""
    show = line if part == "rows" else gen_line
    return [f"{show(r)}  (kept: process {r['process']})"
            for r in out[part] if r["status"] == "ok"]


def gen_line(r: Row) -> str:
    """One line per sampling variant."""
    done = (f"{r['new_tokens_per_s']:12,.0f} new tok/s  warm-up {r['warmup_s']:.1f} s"
            if r["status"] == "ok" else r.get("error", ""))
    return f"gen {r['shape']} {r['variant']:14} {r['status']:7} {done}"
