"""The (pp, dp, tp) grid of ranks and its process groups.

A world of `W = pp * dp * tp` processes is laid out as a 3-D grid with tp fastest:

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank

so the ranks of one tensor-parallel group are neighbours (on one node, sharing NVLink), the ranks of a
data-parallel group hold the same shard of the model, and the ranks of a pipeline group hold successive
stages. Every process builds every group (torch.distributed requires all ranks to take part in each
`new_group` call, in the same order) and keeps the three it belongs to.

Groups are handed to layers explicitly. In a single process (no torchrun) every group is `None` and every
layer behaves as its size-1 self.
"""

from __future__ import annotations

import datetime
import os
import time
import uuid
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the three parallel dimensions; their product is the world size."""

    dp: int = 1
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelDims.{name}={value!r}: expected a positive integer")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    def coords_of(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank."""
        tp_rank = rank % self.tp
        dp_rank = (rank // self.tp) % self.dp
        pp_rank = rank // (self.tp * self.dp)
        return pp_rank, dp_rank, tp_rank

    def tp_group_ranks(self) -> list[list[int]]:
        return [
            [self.rank_of(p, d, t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)
        ]

    def dp_group_ranks(self) -> list[list[int]]:
        return [
            [self.rank_of(p, d, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)
        ]

    def pp_group_ranks(self) -> list[list[int]]:
        return [
            [self.rank_of(p, d, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)
        ]


@dataclass
class Topology:
    """This process's place in the grid, its device and its three process groups."""

    dims: ParallelDims
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    tp_ranks: list[int] = field(default_factory=lambda: [0])
    dp_ranks: list[int] = field(default_factory=lambda: [0])
    pp_ranks: list[int] = field(default_factory=lambda: [0])
    owns_world: bool = False

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None

    @property
    def tp_size(self) -> int:
        return self.dims.tp

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    @property
    def pp_size(self) -> int:
        return self.dims.pp

    @property
    def tp_rank(self) -> int:
        return self.dims.coords_of(self.rank)[2]

    @property
    def dp_rank(self) -> int:
        return self.dims.coords_of(self.rank)[1]

    @property
    def pp_rank(self) -> int:
        return self.dims.coords_of(self.rank)[0]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def __repr__(self) -> str:
        return (
            f"Topology(rank={self.rank}/{self.world_size}, pp={self.pp_rank}/{self.pp_size}, "
            f"dp={self.dp_rank}/{self.dp_size}, tp={self.tp_rank}/{self.tp_size}, device={self.device}, "
            f"backend={self.backend})"
        )


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)


def init_distributed(
    dims: ParallelDims | None = None,
    backend: str | None = None,
    timeout: float | datetime.timedelta | None = None,
) -> Topology:
    """Join (or start) the torchrun world and build the (pp, dp, tp) process groups.

    Reads RANK / WORLD_SIZE / LOCAL_RANK from torchrun's environment; without them this is a single
    process and all groups are None. `dims=None` means pure data parallelism (dp = world size).
    `backend=None` picks nccl when CUDA is available and gloo otherwise. `timeout` (seconds or a
    timedelta, default 600 s) bounds every collective, so a lost rank fails loudly instead of hanging.
    If the default process group already exists (a test harness, a sweep) it is reused.
    """
    world_size = dist.get_world_size() if dist.is_initialized() else _env_int("WORLD_SIZE", 1)
    rank = dist.get_rank() if dist.is_initialized() else _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank if dist.is_initialized() else 0)
    dims = dims if dims is not None else ParallelDims(dp=world_size)
    if dims.world_size != world_size:
        raise ValueError(
            f"dp*tp*pp = {dims.dp}*{dims.tp}*{dims.pp} = {dims.world_size} does not equal "
            f"world_size={world_size}"
        )
    if backend is not None and backend not in ("gloo", "nccl"):
        raise ValueError(f"backend={backend!r}: expected 'gloo', 'nccl' or None (auto)")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend='nccl' needs CUDA, but torch.cuda.is_available() is False; use 'gloo'")
    if timeout is None:
        timeout = DEFAULT_TIMEOUT_S
    if not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=float(timeout))

    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if use_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    if world_size == 1 and not dist.is_initialized() and "RANK" not in os.environ:
        return Topology(dims=dims, rank=0, local_rank=0, device=device)

    owns_world = False
    if not dist.is_initialized():
        chosen = backend or ("nccl" if use_cuda else "gloo")
        kwargs = {"device_id": device} if chosen == "nccl" else {}
        store = _attempt_store(rank, world_size, timeout)
        if store is not None:
            kwargs.update(store=store, rank=rank, world_size=world_size)
        dist.init_process_group(chosen, timeout=timeout, **kwargs)
        owns_world = True
    topo = Topology(
        dims=dims,
        rank=rank,
        local_rank=local_rank,
        device=device,
        backend=dist.get_backend(),
        owns_world=owns_world,
    )
    for attr, all_ranks in (
        ("tp", dims.tp_group_ranks()),
        ("dp", dims.dp_group_ranks()),
        ("pp", dims.pp_group_ranks()),
    ):
        for ranks in all_ranks:
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                setattr(topo, f"{attr}_group", group)
                setattr(topo, f"{attr}_ranks", ranks)
    return topo


def _attempt_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun, the rendezvous store with this attempt's keys apart from earlier attempts'.

    torchrun's c10d rendezvous shares one TCPStore across worker restarts (`--max-restarts`) without
    separating the attempts (pytorch/pytorch#135712), so a restarted worker may read a dead worker's
    address and fail to connect. Every key is prefixed with a token all ranks of this attempt agree on
    through the store (`_agree_on_attempt`); TORCHELASTIC_RESTART_COUNT cannot serve, since each node's
    agent counts its own restarts and the counts differ between nodes after a restart. None outside
    torchrun (or without MASTER_ADDR/MASTER_PORT): plain env:// initialisation.
    """
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    from torch.distributed.rendezvous import _create_c10d_store  # what env:// uses; agent store aware

    store = _create_c10d_store(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank, world_size, timeout
    )
    attempt = _agree_on_attempt(store, rank, world_size, timeout)
    return dist.PrefixStore(f"{STORE_PREFIX}/attempt-{attempt}/default_pg", store)


STORE_PREFIX = "mla-parallel"


def _agree_on_attempt(store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta) -> str:
    """A token naming this attempt, the same on every rank, from a store that still holds the keys of
    earlier attempts (whose processes are all gone: torchrun stops every worker before a new round).

    Rank 0 publishes a fresh token under `leader`; every other rank answers the token it reads with a
    nonce of its own, and waits for `go/<its nonce>`, which only the live rank 0 writes, after reading
    that answer under its own token. A rank that read a dead attempt's token gets no answer and reads
    `leader` again, so no stale key can be taken for this attempt's."""
    key = f"{STORE_PREFIX}/agree"
    deadline = time.monotonic() + timeout.total_seconds()
    if rank == 0:
        token = uuid.uuid4().hex
        store.set(f"{key}/leader", token)
        store.wait([f"{key}/ack/{token}/{r}" for r in range(1, world_size)], timeout)
        for r in range(1, world_size):
            store.set(f"{key}/go/{store.get(f'{key}/ack/{token}/{r}').decode()}", token)
        return token
    nonce, answered = uuid.uuid4().hex, None
    while time.monotonic() < deadline:
        if store.check([f"{key}/go/{nonce}"]):
            return store.get(f"{key}/go/{nonce}").decode()
        if store.check([f"{key}/leader"]):
            token = store.get(f"{key}/leader").decode()
            if token != answered:
                store.set(f"{key}/ack/{token}/{rank}", nonce)
                answered = token
        time.sleep(0.05)
    raise TimeoutError(
        f"rank {rank}: rank 0 did not start this attempt within {timeout.total_seconds():.0f} s "
        f"(torchrun store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')})"
    )


def destroy_distributed(topology: Topology | None = None) -> None:
    """Tear down the world if `init_distributed` created it; in a reused world, only its subgroups."""
    if topology is not None and not topology.owns_world:
        for group in {topology.tp_group, topology.dp_group, topology.pp_group} - {None}:
            dist.destroy_process_group(group)
        topology.tp_group = topology.dp_group = topology.pp_group = None
        return
    if dist.is_initialized():
        dist.destroy_process_group()
