"""The (pp, dp, cp, tp) grid of ranks and its process groups.

A world of `W = pp * dp * cp * tp` processes is laid out as a 4-D grid with tp fastest:

    rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank

so the ranks of one tensor-parallel group are neighbours (on one node, sharing NVLink), then the
context-parallel ranks that split one sequence, then the data-parallel replicas, then the pipeline
stages. Every process builds every group (torch.distributed requires all ranks to take part in each
`new_group` call, in the same order) and keeps the ones it belongs to.

Groups (a rank belongs to exactly one of each kind):

- `tp_group`: same (pp, dp, cp) — the shards of one layer.
- `cp_group`: same (pp, dp, tp) — the chunks of one sequence.
- `dp_group`: same (pp, cp, tp) — the replicas that take different batch rows.
- `pp_group`: same (dp, cp, tp) — the successive stages.
- `dp_cp_group`: same (pp, tp) — every rank holding the same (dense) parameters, dp * cp of them: the
  group gradients are averaged over. It is `dp_group` itself when cp = 1.
- Expert parallelism carves `ep` ranks out of the data-parallel ranks, consecutive in dp:
  `dp_rank = edp_rank * ep + ep_rank`. `ep_group`: same (pp, cp, tp, edp_rank) — the ranks whose
  experts together make one layer's full set, exchanging tokens by all-to-all. `edp_group`: same
  (pp, tp, ep_rank) — every rank holding the same experts ((dp / ep) * cp of them): the group expert
  gradients are averaged over. It is `dp_cp_group` itself when ep = 1.

Groups of one rank are not built: `cp_group` is None when cp = 1 and `ep_group` None when ep = 1, like
every group in a single process (no torchrun), where each layer behaves as its size-1 self. Groups are
handed to layers explicitly.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .rendezvous import attempt_store

DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the parallel dimensions: `dp * cp * tp * pp` is the world size; `ep` divides `dp`."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "cp", "ep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelDims.{name}={value!r}: expected a positive integer")
        if self.dp % self.ep:
            raise ValueError(
                f"ParallelDims.ep={self.ep} does not divide dp={self.dp}: expert-parallel ranks are "
                "carved out of the data-parallel ranks"
            )

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp * self.pp

    @property
    def edp(self) -> int:
        """Data-parallel replicas of each expert shard (not counting cp)."""
        return self.dp // self.ep

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int, cp_rank: int = 0) -> int:
        return ((pp_rank * self.dp + dp_rank) * self.cp + cp_rank) * self.tp + tp_rank

    def coords_of(self, rank: int) -> tuple[int, int, int, int]:
        """(pp_rank, dp_rank, cp_rank, tp_rank) of a global rank."""
        tp_rank = rank % self.tp
        cp_rank = (rank // self.tp) % self.cp
        dp_rank = (rank // (self.tp * self.cp)) % self.dp
        pp_rank = rank // (self.tp * self.cp * self.dp)
        return pp_rank, dp_rank, cp_rank, tp_rank

    def _groups(self, *varying: str) -> list[list[int]]:
        """Every group whose members differ only along the `varying` axes of the grid, whose axes are
        pp, edp, ep, cp, tp (dp split in two: dp_rank = edp_rank * ep + ep_rank)."""
        sizes = {"pp": self.pp, "edp": self.edp, "ep": self.ep, "cp": self.cp, "tp": self.tp}
        fixed = [axis for axis in sizes if axis not in varying]
        groups = []
        for fixed_index in _product([sizes[axis] for axis in fixed]):
            where = dict(zip(fixed, fixed_index, strict=True))
            members = []
            for varying_index in _product([sizes[axis] for axis in varying]):
                where.update(zip(varying, varying_index, strict=True))
                dp_rank = where["edp"] * self.ep + where["ep"]
                members.append(self.rank_of(where["pp"], dp_rank, where["tp"], where["cp"]))
            groups.append(sorted(members))
        return groups

    def tp_group_ranks(self) -> list[list[int]]:
        """Groups sharing (pp, dp, cp)."""
        return self._groups("tp")

    def cp_group_ranks(self) -> list[list[int]]:
        """Groups sharing (pp, dp, tp)."""
        return self._groups("cp")

    def dp_group_ranks(self) -> list[list[int]]:
        """Groups sharing (pp, cp, tp)."""
        return self._groups("edp", "ep")

    def pp_group_ranks(self) -> list[list[int]]:
        """Groups sharing (dp, cp, tp)."""
        return self._groups("pp")

    def dp_cp_group_ranks(self) -> list[list[int]]:
        """Groups sharing (pp, tp): every rank holding the same dense parameters."""
        return self._groups("edp", "ep", "cp")

    def ep_group_ranks(self) -> list[list[int]]:
        """Groups sharing (pp, cp, tp, edp): one full set of experts between them."""
        return self._groups("ep")

    def edp_group_ranks(self) -> list[list[int]]:
        """Groups sharing (pp, tp, ep): every rank holding the same experts."""
        return self._groups("edp", "cp")


def _product(sizes: list[int]) -> list[tuple[int, ...]]:
    """Every index tuple of a grid of these sizes, the last axis fastest."""
    indices: list[tuple[int, ...]] = [()]
    for size in sizes:
        indices = [index + (i,) for index in indices for i in range(size)]
    return indices


@dataclass
class Topology:
    """This process's place in the grid, its device and its process groups (see the module docstring).

    `*_ranks` are the global ranks of each group this process belongs to; a group of one rank is None.
    """

    dims: ParallelDims
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    cp_group: dist.ProcessGroup | None = None
    ep_group: dist.ProcessGroup | None = None
    dp_cp_group: dist.ProcessGroup | None = None
    edp_group: dist.ProcessGroup | None = None
    tp_ranks: list[int] = field(default_factory=lambda: [0])
    dp_ranks: list[int] = field(default_factory=lambda: [0])
    pp_ranks: list[int] = field(default_factory=lambda: [0])
    cp_ranks: list[int] = field(default_factory=lambda: [0])
    ep_ranks: list[int] = field(default_factory=lambda: [0])
    dp_cp_ranks: list[int] = field(default_factory=lambda: [0])
    edp_ranks: list[int] = field(default_factory=lambda: [0])
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
    def cp_size(self) -> int:
        return self.dims.cp

    @property
    def ep_size(self) -> int:
        return self.dims.ep

    @property
    def dp_cp_size(self) -> int:
        return self.dims.dp * self.dims.cp

    @property
    def edp_size(self) -> int:
        return self.dims.edp * self.dims.cp

    @property
    def tp_rank(self) -> int:
        return self.dims.coords_of(self.rank)[3]

    @property
    def cp_rank(self) -> int:
        return self.dims.coords_of(self.rank)[2]

    @property
    def dp_rank(self) -> int:
        return self.dims.coords_of(self.rank)[1]

    @property
    def pp_rank(self) -> int:
        return self.dims.coords_of(self.rank)[0]

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.dims.ep

    @property
    def dp_cp_rank(self) -> int:
        return self.dp_cp_ranks.index(self.rank)

    @property
    def edp_rank(self) -> int:
        return self.edp_ranks.index(self.rank)

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
            f"dp={self.dp_rank}/{self.dp_size}, cp={self.cp_rank}/{self.cp_size}, "
            f"tp={self.tp_rank}/{self.tp_size}, ep={self.ep_rank}/{self.ep_size}, device={self.device}, "
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
    """Join (or start) the torchrun world and build the (pp, dp, cp, tp) process groups.

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
            f"dp*cp*tp*pp = {dims.dp}*{dims.cp}*{dims.tp}*{dims.pp} = {dims.world_size} does not equal "
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
        store = attempt_store(rank, world_size, timeout)
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
    _build_groups(topo, timeout)
    return topo


def _build_groups(topo: Topology, timeout: datetime.timedelta) -> None:
    """Create every group of every kind (all ranks, same order) and keep this rank's. cp and ep groups
    exist only when cp / ep > 1; dp_cp is dp when cp = 1 and edp is dp_cp when ep = 1 (no copies)."""
    dims = topo.dims
    kinds = [("tp", dims.tp_group_ranks()), ("dp", dims.dp_group_ranks()), ("pp", dims.pp_group_ranks())]
    if dims.cp > 1:
        kinds += [("cp", dims.cp_group_ranks()), ("dp_cp", dims.dp_cp_group_ranks())]
    if dims.ep > 1:
        kinds += [("ep", dims.ep_group_ranks()), ("edp", dims.edp_group_ranks())]
    for attr, all_ranks in kinds:
        for ranks in all_ranks:
            group = dist.new_group(ranks, timeout=timeout)
            if topo.rank in ranks:
                setattr(topo, f"{attr}_group", group)
                setattr(topo, f"{attr}_ranks", ranks)
    if dims.cp == 1:
        topo.dp_cp_group, topo.dp_cp_ranks = topo.dp_group, topo.dp_ranks
    if dims.ep == 1:
        topo.edp_group, topo.edp_ranks = topo.dp_cp_group, topo.dp_cp_ranks


def destroy_distributed(topology: Topology | None = None) -> None:
    """Tear down the world if `init_distributed` created it; in a reused world, only its subgroups."""
    if topology is not None and not topology.owns_world:
        kinds = ("tp", "dp", "pp", "cp", "ep", "dp_cp", "edp")
        for group in {getattr(topology, f"{kind}_group") for kind in kinds} - {None}:
            dist.destroy_process_group(group)
        for kind in kinds:
            setattr(topology, f"{kind}_group", None)
        return
    if dist.is_initialized():
        dist.destroy_process_group()
