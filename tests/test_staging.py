"""execution.Staging: each step's ids reach the device intact, whatever the GPU is still doing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pfreeze.run.step import Staging


def test_staging_on_the_cpu_passes_tensors_through_with_their_shapes() -> None:
    stage = Staging(torch.device("cpu"))
    x, w = torch.arange(12).view(3, 4), torch.tensor([5, 1, 2])
    gx, gw = stage(x, w)
    assert torch.equal(gx, x) and torch.equal(gw, w) and gx.shape == (3, 4)
    assert stage(x, None)[1] is None  # a step without chunk ids


def test_staging_refuses_what_is_not_int64_on_the_host() -> None:
    stage = Staging(torch.device("cpu"))
    with pytest.raises(ValueError, match="int64 tensors on the host"):
        stage(torch.zeros(3, dtype=torch.int32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned ring is for CUDA")
def test_staging_never_refills_a_buffer_whose_copy_is_still_queued() -> None:
    """The ring is filled (its pinned buffers allocated) first; then the GPU is held busy (a
    sleep kernel) while the host stages three times as many batches as the ring has buffers:
    without the wait on each buffer's last copy, later batches would overwrite earlier ones
    before the GPU read them."""
    dev = torch.device("cuda", torch.cuda.device_count() - 1)  # not the current one, if 2+
    stage = Staging(dev, depth=4)
    for _ in range(4):
        stage(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    torch.cuda.synchronize(dev)
    with torch.cuda.device(dev):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued ahead of the copies
    batches = [torch.full((2, 8), i) for i in range(12)]
    windows = [torch.tensor([i, -i]) for i in range(12)]
    got = [stage(x, w) for x, w in zip(batches, windows, strict=True)]
    for (gx, gw), x, w in zip(got, batches, windows, strict=True):
        assert gx.device == dev and gx.shape == x.shape
        assert torch.equal(gx.cpu(), x) and torch.equal(gw.cpu(), w)
    assert len(stage.slots) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a GPU run")
def test_a_gpu_run_stages_each_step_once_and_trains_every_arm(tmp_path: Path) -> None:
    """run() stages a step's batch and chunk ids for all arms, once: train_step must take them
    as they are (a batch on cuda:0 while the loop's device is plain `cuda`), with gradient
    accumulation and a cached arm, and no arm may stop."""
    from pfreeze.config import load_config
    from pfreeze.run.session import run

    calls = []
    real = Staging.__call__

    def counted(self: Staging, *host: torch.Tensor) -> list[torch.Tensor]:
        calls.append(len(host))
        return real(self, *host)

    corpus = tmp_path / "c.txt"
    corpus.write_text("Call me Ishmael. Some years ago, never mind how long precisely. " * 32)
    cfg = load_config(None, [
        f"data.corpus={corpus}", "model.name=random:llama", "data.block_size=32",
        "data.sampling=epochs", "training.device=cuda", "training.max_steps=24",
        "training.per_device_train_batch_size=4", "training.gradient_accumulation_steps=2",
        "training.logging_steps=8", "training.eval_steps=24", "generation.max_new_tokens=4",
        "generation.samples_per_prompt=1", "generation.prompts=[Call me]",
        "arms=[{kind: full}, {kind: plan, select: 'layers=2: roles=q,k,v'}]",
    ])
    Staging.__call__ = counted  # type: ignore[method-assign]
    try:
        arms = run(cfg, tmp_path / "out", overwrite=True)["arms"]
    finally:
        Staging.__call__ = real  # type: ignore[method-assign]
    assert calls == [2] * 24  # one transfer per step (batch and chunk ids), for both arms
    pc = arms["plan"]["prefix_cache"]  # 57 chunks, 8 windows a step: 2nd epoch from step 8
    assert pc["hits"] + pc["misses"] == 24 * 8 and pc["misses"] >= 57 and pc["hits"] >= 100
    assert all(a["integrity"]["ok"] and a["status"] == "finished" for a in arms.values())
    rows = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert sum('"kind": "train"' in r for r in rows) == 2 * 24


if __name__ == "__main__":  # on the GPU machine, without the test runner
    test_staging_on_the_cpu_passes_tensors_through_with_their_shapes()
    test_staging_refuses_what_is_not_int64_on_the_host()
    test_staging_never_refills_a_buffer_whose_copy_is_still_queued()
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        test_a_gpu_run_stages_each_step_once_and_trains_every_arm(Path(d))
    print("staging tests passed")
