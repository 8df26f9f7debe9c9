"""execution.Staging: each step's ids reach the device intact, whatever the GPU is still doing."""

from __future__ import annotations

import pytest
import torch

from pfreeze.execution import Staging


def test_staging_on_the_cpu_passes_tensors_through_with_their_shapes() -> None:
    stage = Staging(torch.device("cpu"))
    x, w = torch.arange(12).view(3, 4), torch.tensor([5, 1, 2])
    gx, gw = stage(x, w)
    assert torch.equal(gx, x) and torch.equal(gw, w) and gx.shape == (3, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned ring is for CUDA")
def test_staging_never_refills_a_buffer_whose_copy_is_still_queued() -> None:
    """The GPU is held busy (a sleep kernel) while the host stages three times as many batches
    as the ring has buffers: without the wait on each buffer's last copy, later batches would
    overwrite earlier ones before the GPU read them."""
    dev = torch.device("cuda")
    stage = Staging(dev, depth=4)
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued ahead of the copies
    batches = [torch.full((2, 8), i) for i in range(12)]
    windows = [torch.tensor([i, -i]) for i in range(12)]
    got = [stage(x, w) for x, w in zip(batches, windows, strict=True)]
    for (gx, gw), x, w in zip(got, batches, windows, strict=True):
        assert gx.device.type == "cuda" and gx.shape == x.shape
        assert torch.equal(gx.cpu(), x) and torch.equal(gw.cpu(), w)
    assert len(stage.slots) == 4


if __name__ == "__main__":  # the GPU machine has no pytest
    test_staging_on_the_cpu_passes_tensors_through_with_their_shapes()
    test_staging_never_refills_a_buffer_whose_copy_is_still_queued()
    print("staging tests passed")
