"""Checkpoints: everything a run needs to continue exactly where it was killed.

    checkpoint/state.json         step, per-arm metrics so far, scheduler states, samples,
                                  θ₀ hash, batch hashes
    checkpoint/arm<i>.safetensors every tensor the arm ever trains, the Freezer's references
                                  for partly frozen tensors, its best-point tensors
    checkpoint/rng.safetensors    the batch stream's and torch's random states
    checkpoint/arm<i>.optim.pt    the optimizer state (tensors and plain values only: it is
                                  loaded with weights_only=True, never unpickling code)

The folder is written under a temporary name and swapped in with renames, so a kill during a
save leaves the previous checkpoint intact. Weights are restored on top of a freshly loaded θ₀,
so frozen tensors never need to be stored.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from pfreeze import __version__, execution
from pfreeze.atomic import write_json
from pfreeze.config import config_hash
from pfreeze.errors import PfreezeError
from pfreeze.outputs import ensure_space

if TYPE_CHECKING:
    from pfreeze.train import Loop

CKPT = "checkpoint"


# The layout of state.json and the files beside it; a checkpoint of another format is refused.
FORMAT = 2


def _size(loop: Loop) -> int:
    """Bytes a checkpoint takes: trained tensors, references, best tensors, optimizer state."""
    total = 0
    for arm in loop.arms:
        params = arm.freezer.params
        trained = [params[n] for n in arm.strategy.trained_names() if n in params]
        total += sum(p.numel() * p.element_size() for p in trained) * (
            2 if arm.best_state is not None else 1)
        total += sum(t.numel() * t.element_size() for s in arm.optimizer.state.values()
                     for t in s.values() if isinstance(t, torch.Tensor))
        total += sum(part.ref.numel() * part.ref.element_size()
                     for part in arm.freezer.partial.values())
    return total


def save(loop: Loop, step: int, extra: dict[str, Any]) -> Path:
    root = loop.files.root
    tmp, final, old = root / f".{CKPT}.tmp", root / CKPT, root / f".{CKPT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    ensure_space(root, _size(loop), f"the checkpoint at step {step}")
    tmp.mkdir(parents=True)
    try:
        _write(loop, tmp, final, step, extra)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Swap in: the old checkpoint survives until the new one is complete.
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _write(loop: Loop, tmp: Path, final: Path, step: int, extra: dict[str, Any]) -> None:
    arms_state = []
    for i, arm in enumerate(loop.arms):
        if arm.diverged and (final / f"arm{i}.safetensors").exists():
            # A diverged arm keeps its last good weights rather than its non-finite ones; its
            # metrics and status below are current, so a resumed run knows it stopped.
            for suffix in (".safetensors", ".optim.pt"):
                shutil.copy2(final / f"arm{i}{suffix}", tmp / f"arm{i}{suffix}")
            arms_state.append(_arm_state(arm))
            continue
        tensors = {f"param.{n}": t for n, t in arm.strategy.trained_tensors(arm.model).items()}
        tensors.update({f"ref.{n}": part.ref.detach().cpu().clone()
                        for n, part in arm.freezer.partial.items()})
        tensors.update({f"best.{n}": t for n, t in (arm.best_state or {}).items()})
        save_file(tensors, str(tmp / f"arm{i}.safetensors"))
        torch.save(arm.optimizer.state_dict(), tmp / f"arm{i}.optim.pt")
        arms_state.append(_arm_state(arm))
    # Random states on their own: the batch stream, and the global generators that dropout
    # and adapter initialisation draw from.
    rng = {"stream": loop.stream.gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{d}": s for d, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    write_json(tmp / "state.json", {
        "format": FORMAT, "pfreeze_version": __version__, "config_hash": config_hash(loop.cfg),
        "step": step, "theta0_hash": loop.theta0_hash, "batch_hashes": loop.batch_hashes,
        "arms": arms_state, "execution": execution.snapshot(loop), "reserved_mb": loop.reserved_mb,
        # The run's files as they stood at `step`: a resume cuts metrics.jsonl back to this
        # size (rows after it are redone) and restores the samples drawn so far.
        "metrics_bytes": loop.files.metrics_bytes(), "samples": loop.files.samples,
        "sample_records": loop.files.sample_records,
        **extra,
    })


def _arm_state(arm: Any) -> dict[str, Any]:
    return {"name": arm.strategy.name, "losses": arm.losses, "times": arm.times,
            "evals": arm.evals, "peak_mem_mb": arm.peak_mem_mb,
            "scheduler": arm.scheduler.state_dict(), "best": arm.best,
            "bad_evals": arm.bad_evals, "stopped": arm.stopped, "diverged": arm.diverged}


def _folder(root: Path) -> Path | None:
    """The complete checkpoint: normally checkpoint/, or the old one if a kill hit the swap."""
    for d in (root / CKPT, root / f".{CKPT}.old"):
        if (d / "state.json").exists():
            return d
    return None


def exists(root: Path) -> bool:
    return _folder(root) is not None


def load(loop: Loop) -> dict[str, Any]:
    """Restore arms and stream from the checkpoint; returns state.json's contents."""
    d = _folder(loop.files.root)
    assert d is not None, "load() is only called when exists() is true"
    state = json.loads((d / "state.json").read_text(encoding="utf-8"))
    if state.get("format") != FORMAT:
        raise PfreezeError(
            f"the checkpoint in {loop.files.root} was written by pfreeze "
            f"{state.get('pfreeze_version', 'before 0.1.0')} in another format "
            f"({state.get('format', 1)}; this version reads {FORMAT})",
            "start the run again with --overwrite",
        )
    if state["config_hash"] != config_hash(loop.cfg):
        raise PfreezeError(
            f"the checkpoint in {loop.files.root} belongs to another config than the one "
            "resumed now (config.yaml changed since it was saved)",
            "resume with the config the run was started with, or start again with --overwrite",
        )
    if state["theta0_hash"] != loop.theta0_hash:
        raise PfreezeError(
            "the checkpoint was made from a different θ₀ than the model loaded now",
            "resume with the same model files, or start a new run",
        )
    step = state["step"]
    for i, (arm, saved) in enumerate(zip(loop.arms, state["arms"], strict=True)):
        # Replay plan changes up to `step`, so the Freezer knows what was ever trainable.
        for s in sorted(arm.strategy.plans):
            if 0 < s < step:
                arm.freezer.apply(arm.strategy.plans[s])
        tensors = load_file(str(d / f"arm{i}.safetensors"))
        with torch.no_grad():
            for key, t in tensors.items():
                kind, _, name = key.partition(".")
                if kind == "param":
                    arm.freezer.params[name].copy_(t)
                elif kind == "ref" and name in arm.freezer.partial:
                    arm.freezer.partial[name].ref.copy_(t)
                elif kind == "best":
                    arm.best_state = {**(arm.best_state or {}), name: t}
        opt = torch.load(d / f"arm{i}.optim.pt", map_location=loop.device, weights_only=True)
        arm.optimizer.load_state_dict(opt)
        arm.scheduler.load_state_dict(saved["scheduler"])
        arm.losses, arm.times = saved["losses"], saved["times"]
        arm.evals = [tuple(e) for e in saved["evals"]]
        arm.peak_mem_mb = saved["peak_mem_mb"]
        arm.best = tuple(saved["best"]) if saved["best"] else None  # type: ignore[assignment]
        arm.bad_evals, arm.stopped, arm.diverged = (saved["bad_evals"], saved["stopped"],
                                                    saved["diverged"])
        with torch.no_grad():  # ‖ΔW_t‖ of the next step is measured from these weights
            for prev, p in zip(arm.tracker.prev, arm.tracker.params, strict=True):
                prev.copy_(p)
    rng = load_file(str(d / "rng.safetensors"))
    loop.stream.gen.set_state(rng["stream"])
    # One batch per step from step 0, whatever the arms did: the epochs mode's position.
    loop.stream.drawn = step * loop.stream.batch
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    loop.batch_hashes = state["batch_hashes"]
    execution.pin(loop, state["execution"])
    loop.reserved_mb = max(loop.reserved_mb, state["reserved_mb"])
    return state
