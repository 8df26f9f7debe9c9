"""Several processes through torch.distributed: the process group, and which ranks run which arm.

`pfreeze run` under `torchrun --nproc-per-node N` (or `accelerate launch`, which starts
torchrun) finds RANK / WORLD_SIZE / LOCAL_RANK in its environment and joins the group here;
without them it is the single process it always was (World.size 1, no process group).

Placement of the arms over the ranks (`place`):
    arms      world size <= number of arms: arm i on rank i mod N, each arm whole on one
              rank (arm-parallel); every rank draws the identical batch stream
    replicas  world size a multiple of the number of arms, larger: each arm on its own
              contiguous group of N / arms ranks, data parallel inside it (pfreeze.run.sharding)
Any other world size is refused with one line: some ranks would idle or arms would get
unequal shares.

Rank 0 writes the run's files; what the other ranks measured reaches it through `gather`.
A collective that fails because another rank died becomes one line here.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pfreeze.errors import PfreezeError

T = TypeVar("T")

DIED = "another rank stopped mid-run"
DIED_FIX = ("see its error above (the last checkpoint stays usable: "
            "`pfreeze run --resume OUTPUT_DIR` under the same launcher)")


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes (size 1: a plain single process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise PfreezeError(f"environment variable {name}={value!r} is not a number",
                           "launch with torchrun or accelerate launch, which set it") from None


def init_world(device_spec: str = "auto", timeout_s: float | None = None) -> World:
    """Join the process group the launcher describes (nccl for CUDA devices, gloo on the
    CPU), or a World of one where there is none. Idempotent: a group that exists is kept."""
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return World()
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if ":" in device_spec:
        raise PfreezeError(f"training.device={device_spec} would put every rank on one device",
                           "use training.device=auto (or cuda): each rank takes the GPU of its "
                           "LOCAL_RANK")
    cuda = device_spec != "cpu" and not device_spec.startswith(("mps", "xpu")) \
        and torch.cuda.is_available()
    if cuda:
        # Every rank on its own GPU: `cuda` then means this rank's card.
        torch.cuda.set_device(local % max(torch.cuda.device_count(), 1))
    if dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), local, dist.get_backend())
    backend = "nccl" if cuda else "gloo"
    kwargs: dict[str, Any] = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    try:
        dist.init_process_group(backend, rank=rank, world_size=size, **kwargs)
    except (RuntimeError, ValueError, TimeoutError) as e:
        raise PfreezeError(
            f"torch.distributed could not start its {backend} backend on rank {rank} of "
            f"{size} ({' '.join(str(e).split())[:300]})",
            "launch with `torchrun --nproc-per-node N pfreeze run ...` (it sets RANK, "
            "WORLD_SIZE, MASTER_ADDR and MASTER_PORT), or run one process without them",
        ) from None
    # A group left to the interpreter's teardown can abort the process ("terminate called
    # without an active exception") after a clean exit: its threads are joined here first.
    atexit.register(_leave_group)
    return World(rank, size, local, backend)


def _leave_group() -> None:
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


@dataclass
class Placement:
    """Which ranks run which arm (by the arm's index in the config)."""

    world: World
    mode: str  # single, arms or replicas
    ranks: list[list[int]]  # per arm, its ranks (the first one leads: it reports)
    groups: list[Any] = field(default_factory=list)  # per arm, its process group (replicas)

    @property
    def mine(self) -> list[int]:
        """The arms this rank trains."""
        return [i for i, r in enumerate(self.ranks) if self.world.rank in r]

    @property
    def replicas(self) -> int:
        """Ranks per arm (data parallel inside an arm when > 1)."""
        return len(self.ranks[0]) if self.ranks else 1

    @property
    def reports(self) -> bool:
        """Whether this rank's measurements are the ones written (its arms' lead)."""
        return all(self.ranks[i][0] == self.world.rank for i in self.mine)

    def group_of(self, arm: int) -> Any:
        return self.groups[arm] if self.groups else None

    def check_resume(self, replicas: int) -> None:
        """A checkpoint written with `replicas` ranks per arm: each rank's share of the batch
        must be the same now (arm-parallel runs resume under any world size up to the arms)."""
        if replicas != self.replicas:
            n = len(self.ranks)
            raise PfreezeError(
                f"the checkpoint was written with {replicas} rank(s) per arm, this launch "
                f"gives each arm {self.replicas}",
                f"resume with {replicas * n} processes" + (
                    f" (or any number up to {n}: arm-parallel)" if replicas == 1 else ""))

    def describe(self, names: list[str], device: Callable[[int], str]) -> dict[str, Any]:
        """summary.json's record: the world size, the mode, each arm's ranks and devices."""
        return {"world_size": self.world.size, "backend": self.world.backend,
                "mode": self.mode,
                "arms": {n: {"ranks": r, "devices": [device(k) for k in r]}
                         for n, r in zip(names, self.ranks, strict=True)}}


def place(world: World, n_arms: int) -> Placement:
    """Arms over ranks: round-robin where there are no more ranks than arms, else equal
    contiguous groups of replicas; any other world size is refused with one line."""
    if not world.distributed:
        return Placement(world, "single", [[0] for _ in range(n_arms)])

    if world.size <= n_arms:
        return Placement(world, "arms", [[i % world.size] for i in range(n_arms)])
    if world.size % n_arms:
        lower = (world.size // n_arms) * n_arms
        raise PfreezeError(
            f"{world.size} ranks cannot be shared evenly by {n_arms} arm(s): pfreeze gives each "
            "arm the same number of ranks",
            f"launch {n_arms} or fewer processes (arm-parallel) or a multiple of {n_arms} "
            f"(data parallel inside each arm), e.g. --nproc-per-node {lower or n_arms}")
    g = world.size // n_arms
    ranks = [list(range(i * g, (i + 1) * g)) for i in range(n_arms)]
    # Every rank creates every group, in the same order (torch.distributed's rule).
    groups = [dist.new_group(r) for r in ranks]
    return Placement(world, "replicas", ranks, groups)


def single_process_only(what: str, fix: str) -> None:
    """Refuse `what` under a launcher that started several processes."""
    if _env_int("WORLD_SIZE", 1) > 1:
        raise PfreezeError(f"{what} runs in one process, but this launch started "
                           f"{_env_int('WORLD_SIZE', 1)}", f"launch one process, or {fix}")


def _lost(e: RuntimeError) -> PfreezeError:
    return PfreezeError(f"{DIED} ({' '.join(str(e).split())[:200]})", DIED_FIX)


def _peer_lost(e: RuntimeError) -> bool:
    text = f"{type(e).__name__} {e}"
    return any(m in text for m in _PEER_LOST)


def collective(fn: Callable[[], T]) -> T:
    """Run a collective; a peer that died turns into one line instead of a traceback (any
    other error, the same on every rank, keeps its own)."""
    try:
        return fn()
    except RuntimeError as e:  # gloo/nccl errors (DistBackendError is one) and timeouts
        if _peer_lost(e):
            raise _lost(e) from None
        raise


# How gloo and NCCL word a lost peer inside collectives pfreeze does not call itself (FSDP2's
# all-gathers in the forward, DDP's all-reduce in the backward).
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote worker",
              "Timed out waiting", "NCCL communicator was aborted", "DistBackendError",
              "Broken pipe")


@contextlib.contextmanager
def peers_watched(world: World) -> Iterator[None]:
    """A run on several ranks: a collective that fails because a peer died is one line."""
    try:
        yield
    except RuntimeError as e:
        if world.distributed and _peer_lost(e):
            raise _lost(e) from None
        raise


def gather(world: World, obj: Any) -> list[Any] | None:
    """Every rank's `obj` on rank 0 (in rank order); None on the other ranks."""
    if not world.distributed:
        return [obj]
    out: list[Any] | None = [None] * world.size if world.is_main else None
    collective(lambda: dist.gather_object(obj, out, dst=0))
    return out


def all_gather(world: World, obj: Any) -> list[Any]:
    """Every rank's `obj` on every rank (in rank order)."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    collective(lambda: dist.all_gather_object(out, obj))
    return out


def any_rank(world: World, flag: bool) -> bool:
    """Whether `flag` holds on some rank (every rank gets the same answer)."""
    return any(all_gather(world, bool(flag)))


def same_everywhere(world: World, value: str, what: str) -> None:
    """Stop with one line when ranks disagree on `value` (a θ₀ hash, a batch hash)."""
    values = all_gather(world, value)
    if len(set(values)) > 1:
        odd = next(r for r, v in enumerate(values) if v != values[0])
        raise PfreezeError(
            f"{what} differs between ranks (rank 0: {values[0]}, rank {odd}: {values[odd]})",
            "every rank must load the same model files and corpus: use one shared path and "
            "the same pfreeze version on every node")


def device_name(world: World, device: torch.device) -> Callable[[int], str]:
    """Each rank's device, as this rank would name it (one node: cuda:<local rank>)."""
    if device.type != "cuda":
        return lambda rank: str(device)
    per_node = _env_int("LOCAL_WORLD_SIZE", max(torch.cuda.device_count(), 1))
    return lambda rank: f"cuda:{rank % per_node}"
