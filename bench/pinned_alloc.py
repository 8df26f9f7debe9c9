"""Does allocating page-locked memory make the host wait for the GPU?

    python -m bench.pinned_alloc

Asked in session 6 of the one "host sync" per bench run (the first row, at a frame in torch's
set_sync_debug_mode). With ~0.1 s of GPU work queued, times one fresh pinned allocation on
the host and whether CUDA's sync debug mode flags it, then the same for a cached block. On the
H200 (docs/BENCHMARKS.md, session 6): 1.7 ms for the first block, 0.1 ms after, never the
0.1 s a wait would take, never flagged. The "sync" was the debug mode's own notice that it is
a prototype, which the bench counted until session 6 (results.sync_sites).
"""

import time

import torch

from bench.results import host_syncs


def probe(what: str, n: int) -> None:
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # GPU busy for a while, host free
    with host_syncs(True) as flagged:
        t0 = time.perf_counter()
        buf = torch.empty(n, dtype=torch.long, pin_memory=True)
        dt = time.perf_counter() - t0
    print(f"{what:28} {dt * 1e3:8.2f} ms on the host, flagged: {flagged or 'no'}")
    del buf


if __name__ == "__main__":
    torch.zeros(1, device="cuda")
    t0 = time.perf_counter()
    torch.cuda._sleep(200_000_000)
    torch.cuda.synchronize()
    print(f"the queued GPU work alone   {(time.perf_counter() - t0) * 1e3:8.2f} ms")
    probe("fresh block (1st)", 8 * 512 + 64)
    probe("fresh block (2nd, other size)", 16 * 512 + 64)
    probe("freed block reused", 8 * 512 + 64)
