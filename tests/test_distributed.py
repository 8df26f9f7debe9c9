"""pfreeze under torch.distributed: 2 gloo processes started as torchrun starts them, on the
CPU, each result compared with the same experiment in one process.

    arm-parallel   2 arms on 2 ranks: metrics.jsonl (losses, ‖ΔW‖, evaluations, batch hashes),
                   samples and final tensors identical to one process
    data parallel  1 LISA arm (its trainable set changes every 2 steps) on 2 ranks: equal to
                   one process with 2 accumulation steps
    FSDP2          1 partly frozen arm sharded over 2 ranks, killed and resumed: frozen
                   elements bit-identical (the audit on the shards), losses and tensors equal
                   to one process
    resume         a rank SIGKILLed after a checkpoint: an arm-parallel run resumed in one
                   process ends where the uninterrupted 2-rank run ends; a sharded arm resumes
                   under 2 ranks from its torch.distributed.checkpoint shards
    signals        SIGTERM on one rank: both stop at the same step with a checkpoint and a
                   summary of every arm; resumed in one process, the run ends the same
Each launch costs a few seconds of imports per process, so every launch serves several checks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from pfreeze.config import load_config
from pfreeze.errors import PfreezeError
from pfreeze.models.load import load_model
from pfreeze.run import distributed
from pfreeze.run.session import run

BASE = [
    "model.name=random:llama", "data.block_size=32", "training.max_steps=6",
    "training.device=cpu", "training.logging_steps=2", "training.eval_steps=4",
    "training.weight_decay=0.1", "training.warmup_steps=1", "generation.max_new_tokens=4",
    "generation.samples_per_prompt=1", "generation.prompts=[Call me]",
]
TWO_ARMS = BASE + ["training.save_steps=3",
                   "arms=[{kind: full}, {kind: plan, select: 'layers=1: roles=q,k,v'}]"]
# LISA re-draws its trained blocks every 2 steps: the DDP wrapper is rebuilt each time.
LISA = BASE + ["training.per_device_train_batch_size=2",
               "arms=[{kind: lisa, gamma: 1, interval: 2}]"]

# Partly trained tensors (head 0 of q, k, v in block 1): their masks are cut like the FSDP2
# shards of their tensors.
SHARDED = BASE + ["training.per_device_train_batch_size=2",
                  "arms=[{kind: plan, select: 'layers=1: roles=q,k,v heads=0'}]"]

# One pfreeze run per process; with KILL_AT, rank 1 sends itself SIGNAL after that step.
DRIVER = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from pfreeze.config import load_config
from pfreeze.errors import PfreezeError
from pfreeze.run.interrupts import Interrupted
from pfreeze.run.session import run
corpus, out, kill_at, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
cfg = load_config(None, sys.argv[5:] + [f"data.corpus={corpus}"])
def on_step(step, losses):
    if step == kill_at and os.environ.get("RANK") == "1":
        os.kill(os.getpid(), int(os.environ.get("SIGNAL", signal.SIGKILL)))
try:
    run(cfg, out, overwrite=not resume, on_step=on_step, resume=resume)
except PfreezeError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
except Interrupted as e:
    print(f"rank {os.environ['RANK']} interrupted at step {e.step}: {e.note}", file=sys.stderr)
    sys.exit(e.exit_code)
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "text.txt"
    p.write_text("Call me Ishmael. Some years ago, never mind how long precisely. " * 80)
    return p


@dataclass
class Launch:
    returncode: int  # the first non-zero exit status of the ranks (0: both finished)
    stderr: str
    codes: list[int]  # each rank's


def _launch(tmp: Path, corpus: Path, out: Path, overrides: list[str], kill_at: int = -1,
            resume: bool = False, signum: int = signal.SIGKILL) -> Launch:
    """Both ranks as torchrun starts them (the same environment variables), without
    torchrun's agent process: the test hosts the rendezvous store on a port the OS picks."""
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, str(driver), str(corpus), str(out), str(kill_at), str(int(resume)),
           *overrides]
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
           "TORCHELASTIC_USE_AGENT_STORE": "True", "SIGNAL": str(int(signum))}
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    errs = [p.communicate(timeout=240)[1] for p in procs]
    del store
    codes = [p.returncode for p in procs]
    return Launch(next((c for c in codes if c), 0), "\n".join(errs), codes)


def _alone(corpus: Path, out: Path, overrides: list[str], resume: bool = False
           ) -> dict[str, Any]:
    cfg = load_config(None, overrides + [f"data.corpus={corpus}"])
    return run(cfg, out, overwrite=not resume, resume=resume)


def _rows(out: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without the timings (the only values that differ between runs)."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("step_time_s", None)
        r.pop("tokens_per_s", None)
    return rows


def _tensors(out: Path, arm: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / "arms" / arm / "trained.safetensors"))


@pytest.fixture(scope="module")
def parallel(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("parallel")
    done = _launch(tmp, corpus, tmp / "run", TWO_ARMS)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "run"


def test_arm_parallel_equals_one_process(parallel: Path, corpus: Path, tmp_path: Path) -> None:
    alone = _alone(corpus, tmp_path / "one", TWO_ARMS)
    summary = json.loads((parallel / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["distribution"] == {
        "world_size": 2, "backend": "gloo", "mode": "arms", "fsdp": False,
        "arms": {"full": {"ranks": [0], "devices": ["cpu"]},
                 "plan": {"ranks": [1], "devices": ["cpu"]}}}
    assert alone["distribution"]["world_size"] == 1
    # Losses, ‖ΔW‖, evaluations and batch hashes, row for row in one process's order.
    rows = _rows(parallel)
    assert rows == _rows(tmp_path / "one")
    assert {r["arm"] for r in rows} == {"full", "plan"}
    assert (parallel / "samples.jsonl").read_text() == (tmp_path / "one" / "samples.jsonl"
                                                        ).read_text()
    for arm in ("full", "plan"):
        a, b = _tensors(parallel, arm), _tensors(tmp_path / "one", arm)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert summary["arms"][arm]["last_loss"] == alone["arms"][arm]["last_loss"]
        assert summary["arms"][arm]["integrity"]["ok"]
    assert summary["arms"]["plan"]["integrity"]["checked_elements"] > 0


def test_data_parallel_equals_gradient_accumulation(corpus: Path, tmp_path: Path) -> None:
    done = _launch(tmp_path, corpus, tmp_path / "ddp", LISA)
    assert done.returncode == 0, done.stderr[-3000:]
    _alone(corpus, tmp_path / "acc", LISA + ["training.gradient_accumulation_steps=2"])
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["distribution"]["mode"] == "replicas"
    assert summary["distribution"]["arms"]["lisa"]["ranks"] == [0, 1]
    ddp, acc = _rows(tmp_path / "ddp"), _rows(tmp_path / "acc")
    assert [(r["kind"], r["step"], r.get("batch_hash")) for r in ddp] == \
        [(r["kind"], r["step"], r.get("batch_hash")) for r in acc]
    for r, s in zip(ddp, acc, strict=True):
        for key in ("loss", "val_loss"):
            if key in r:
                assert r[key] == pytest.approx(s[key], abs=1e-5)
        assert r.get("dw", {}).keys() == s.get("dw", {}).keys()
        for w in r.get("dw", {}):
            assert r["dw"][w] == pytest.approx(s["dw"][w], abs=1e-6)
    assert any(r.get("dw") for r in ddp)
    a, b = _tensors(tmp_path / "ddp", "lisa"), _tensors(tmp_path / "acc", "lisa")
    assert a.keys() == b.keys() and a
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert summary["arms"]["lisa"]["integrity"]["ok"]


def test_data_parallel_resumed_between_plan_changes_equals_accumulation(
        corpus: Path, tmp_path: Path) -> None:
    """Killed after step 6, resumed from step 5: LISA's plan of step 4 (block 3) holds, and
    the DDP wrapper must register that plan's tensors, not the first plan's (block 0), for
    step 6 to agree."""
    lisa = LISA + ["training.max_steps=8"]
    done = _launch(tmp_path, corpus, tmp_path / "ddp", lisa + ["training.save_steps=5"],
                   kill_at=6)
    assert done.returncode != 0
    done = _launch(tmp_path, corpus, tmp_path / "ddp", lisa + ["training.save_steps=5"],
                   resume=True)
    assert done.returncode == 0, done.stderr[-3000:]
    _alone(corpus, tmp_path / "acc", lisa + ["training.save_steps=5",
                                             "training.gradient_accumulation_steps=2"])
    ddp, acc = _rows(tmp_path / "ddp"), _rows(tmp_path / "acc")
    assert [(r["kind"], r["step"]) for r in ddp] == [(r["kind"], r["step"]) for r in acc]
    for r, s in zip(ddp, acc, strict=True):
        if "loss" in r:
            assert r["loss"] == pytest.approx(s["loss"], abs=1e-5)
    a, b = _tensors(tmp_path / "ddp", "lisa"), _tensors(tmp_path / "acc", "lisa")
    assert a.keys() == b.keys() and a
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_fsdp2_killed_and_resumed_keeps_frozen_elements_and_equals_one_process(
        corpus: Path, tmp_path: Path) -> None:
    sharded = SHARDED + ["training.fsdp=true", "training.save_steps=3"]
    done = _launch(tmp_path, corpus, tmp_path / "fsdp", sharded, kill_at=5)
    assert done.returncode != 0
    assert "another rank stopped mid-run" in done.stderr
    assert (tmp_path / "fsdp" / "checkpoint" / "arm0.dcp" / ".metadata").exists()
    done = _launch(tmp_path, corpus, tmp_path / "fsdp", sharded, resume=True)
    assert done.returncode == 0, done.stderr[-3000:]
    alone = _alone(corpus, tmp_path / "acc", SHARDED + ["training.gradient_accumulation_steps=2"])
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["distribution"]["fsdp"] is True
    assert summary["arms"]["plan"]["prefix_cache"] == {"off": "off: the arm is sharded (FSDP2)"}
    # The audit ran on both shards and checked every frozen element of the whole model.
    audit, whole = summary["arms"]["plan"]["integrity"], alone["arms"]["plan"]["integrity"]
    assert audit["ok"] and audit["shards"] == 2
    assert audit["checked_elements"] == whole["checked_elements"] > 0
    fsdp, acc = _rows(tmp_path / "fsdp"), _rows(tmp_path / "acc")
    assert [(r["kind"], r["step"]) for r in fsdp] == [(r["kind"], r["step"]) for r in acc]
    for r, s in zip(fsdp, acc, strict=True):
        for key in ("loss", "val_loss"):
            if key in r:
                assert r[key] == pytest.approx(s[key], abs=1e-5)
        assert r.get("dw", {}).keys() == s.get("dw", {}).keys()
        for w in r.get("dw", {}):  # summed over the shards
            assert r["dw"][w] == pytest.approx(s["dw"][w], rel=1e-4, abs=1e-7)
    assert any(r.get("dw") for r in fsdp)
    a, b = _tensors(tmp_path / "fsdp", "plan"), _tensors(tmp_path / "acc", "plan")
    assert a.keys() == b.keys() and a
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    # Frozen heads of the trained q, k, v are θ₀ bit for bit (k, v: 2 KV heads of 16 rows).
    base = dict(load_model("random:llama", None, seed=0).model.named_parameters())
    for name in ("q_proj", "k_proj"):
        key = f"model.layers.1.self_attn.{name}.weight"
        assert torch.equal(a[key][16:], base[key][16:].detach())
        assert not torch.equal(a[key][:16], base[key][:16].detach())


def test_arm_parallel_killed_then_resumed_in_one_process(parallel: Path, corpus: Path,
                                                         tmp_path: Path) -> None:
    """An arm-parallel checkpoint holds every arm: it resumes under another world size (here
    one process) and ends where the uninterrupted 2-rank run ends."""
    killed = tmp_path / "killed"
    done = _launch(tmp_path, corpus, killed, TWO_ARMS, kill_at=5)
    assert done.returncode != 0
    assert (killed / "checkpoint" / "state.json").exists()
    assert not (killed / "summary.json").exists()
    _alone(corpus, killed, TWO_ARMS, resume=True)
    assert _rows(killed) == _rows(parallel)
    for arm in ("full", "plan"):
        a, b = _tensors(killed, arm), _tensors(parallel, arm)
        assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)


def test_a_signal_on_one_rank_stops_both_at_one_step_with_a_checkpoint(
        parallel: Path, corpus: Path, tmp_path: Path) -> None:
    """SIGTERM reaches rank 1 after step 1; the ranks agree on it at the step-2 flush, both
    stop there, and the checkpoint and summary hold every arm."""
    out = tmp_path / "run"
    done = _launch(tmp_path, corpus, out, TWO_ARMS, kill_at=1, signum=signal.SIGTERM)
    assert done.codes == [143, 143], done.stderr[-3000:]
    assert done.stderr.count("interrupted at step 2: checkpoint at step 2 kept") == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupted_at_step"] == 2
    assert set(summary["arms"]) == {"full", "plan"}
    _alone(corpus, out, TWO_ARMS, resume=True)
    assert _rows(out) == _rows(parallel)


# ---------------------------------------------------------------- one process, one line each
def test_placement_over_ranks() -> None:
    w = distributed.World(rank=1, size=4, backend="gloo")
    p = distributed.place(w, 4)
    assert p.mode == "arms" and p.mine == [1] and p.replicas == 1
    p = distributed.place(distributed.World(rank=1, size=3), 5)
    assert p.ranks == [[0], [1], [2], [0], [1]] and p.mine == [1, 4]
    assert distributed.place(distributed.World(), 3).mine == [0, 1, 2]
    with pytest.raises(PfreezeError, match="cannot be shared evenly"):
        distributed.place(distributed.World(rank=0, size=3), 2)


def test_a_backend_that_cannot_start_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(PfreezeError, match="could not start its gloo backend") as e:
        distributed.init_world("cpu")
    assert "torchrun" in e.value.fix
    with pytest.raises(PfreezeError, match="would put every rank on one device"):
        distributed.init_world("cuda:1")


def test_repeats_and_sequential_refuse_several_processes(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(None, BASE + ["repeats=2"])
    with pytest.raises(PfreezeError, match="repeats > 1 runs in one process"):
        run(cfg, tmp_path / "r")
    cfg = load_config(None, BASE + ["arms_placement=sequential"])
    with pytest.raises(PfreezeError, match="sequential runs in one process"):
        run(cfg, tmp_path / "s")


def test_a_replicated_checkpoint_refuses_another_world_size() -> None:
    p = distributed.place(distributed.World(), 1)
    with pytest.raises(PfreezeError, match="2 rank\\(s\\) per arm") as e:
        p.check_resume(2)
    assert "resume with 2 processes" in e.value.fix
    p.check_resume(1)


def test_fsdp_settings_that_cannot_run() -> None:
    from pfreeze.run import sharding

    with pytest.raises(PfreezeError, match="gives each arm one rank"):
        sharding.wants_fsdp(True, "arms", fits=True)
    assert sharding.wants_fsdp("auto", "replicas", fits=False)
    assert not sharding.wants_fsdp("auto", "replicas", fits=True)
    assert not sharding.wants_fsdp(False, "replicas", fits=False)
    t = load_config(None, BASE + ["training.keep_best=true"]).training
    with pytest.raises(PfreezeError, match="does not support training.keep_best"):
        sharding.check_fsdp(t)
    t = load_config(None, BASE + ["training.prefix_cache=true", "data.sampling=epochs"]).training
    with pytest.raises(PfreezeError, match="does not support training.prefix_cache=true"):
        sharding.check_fsdp(t)
    with pytest.raises(PfreezeError, match="FSDP2 found no list of None decoder blocks"):
        sharding.Replicas(None, [0], 0, sharded=True).shard(torch.nn.Linear(2, 2))


def test_a_sharded_arm_that_tracks_nothing_settles_its_losses(tmp_path: Path) -> None:
    """A sharded LoRA arm queues no ‖ΔW‖ (zeros(0)): the flush averages its losses alone."""
    from types import SimpleNamespace

    from pfreeze.run import sharding

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        replicas = sharding.Replicas(dist.group.WORLD, [0], 0, sharded=True)
        records = [SimpleNamespace(loss=torch.tensor(float(k)), dw=torch.zeros(0),
                                   dw0=torch.zeros(0)) for k in (1, 2)]
        replicas.settle(records)
        assert [float(r.loss) for r in records] == [1.0, 2.0]
        assert all(r.dw.numel() == 0 for r in records)
        tracked = [SimpleNamespace(loss=torch.tensor(1.0), dw=torch.tensor([3.0, 4.0]),
                                   dw0=torch.tensor([5.0, 12.0])) for _ in range(2)]
        replicas.settle(tracked)  # one shard: the norms come back as they were
        assert all(torch.allclose(r.dw, torch.tensor([3.0, 4.0])) for r in tracked)
        assert all(torch.allclose(r.dw0, torch.tensor([5.0, 12.0])) for r in tracked)
    finally:
        dist.destroy_process_group()


def test_what_ranks_must_agree_on_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    from types import SimpleNamespace

    from pfreeze.run import gathered, sharding

    two = distributed.World(rank=0, size=2, backend="gloo")
    monkeypatch.setattr(distributed, "all_gather", lambda world, value: [value, "f00d"])
    with pytest.raises(PfreezeError, match="θ₀ hash differs between ranks .*rank 1: f00d"):
        distributed.same_everywhere(two, "beef", "the θ₀ hash")
    rows = [{"kind": "train", "step": 3, "batch_hash": h} for h in ("a", "b")]
    with pytest.raises(PfreezeError, match="different batches at step 3"):
        gathered._check_batches(rows)
    with pytest.raises(PfreezeError, match="another rank stopped mid-run"), \
            distributed.peers_watched(two):
        raise RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:8081")
    with pytest.raises(RuntimeError, match="a bug"), distributed.peers_watched(two):
        raise RuntimeError("a bug")  # anything else keeps its traceback
    fused = SimpleNamespace(parts=[(0, 0, 0, slice(0, 16))])
    with pytest.raises(PfreezeError, match="fuse several projections along their rows"):
        sharding.check_tracker(fused, "plan")
    with pytest.raises(PfreezeError, match="lacks the shards of a sharded arm"):
        sharding.Replicas(None, [0], 0, sharded=True).load_shards(
            torch.nn.Linear(1, 1), None, tmp_path / "arm0.dcp")


def test_a_sharded_arm_samples_with_generate_and_refuses_pfreezes_sampler() -> None:
    from pfreeze.run.runtime import Runtime

    lm = load_model("random:llama")
    cfg = load_config(None, BASE + ["arms=[{kind: full}]"])
    rt = Runtime.resolve(cfg.training, cfg.generation, lm.model, 32, sharded=True)
    assert (rt.decoder, rt.decoder_note) == ("generate",
                                             "a sharded arm (FSDP2) samples with generate")
    cfg = load_config(None, BASE + ["arms=[{kind: full}]", "generation.decoder=pfreeze"])
    with pytest.raises(PfreezeError, match="decoder=pfreeze cannot sample from an arm sharded"):
        Runtime.resolve(cfg.training, cfg.generation, lm.model, 32, sharded=True)
