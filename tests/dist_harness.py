"""A pool of gloo worker processes kept alive across tests.

Spawning a world and importing torch costs seconds per test; a pool per world size does it once per
session. `pool.run(fn, *args)` runs `fn(*args)` on every rank (fn must be importable: a module-level
function of a test file) and returns the per-rank results in rank order. The default process group is
initialised once per worker; a test builds its own (pp, dp, tp) subgroups with `init_distributed`.

Failure semantics: if any rank raises, the test fails with every failing rank's traceback; if a rank does
not answer within `timeout` seconds (a hang, a deadlock), the pool is killed and the test fails saying
which ranks were silent. A killed pool is rebuilt on next use.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

GRACE_AFTER_FAILURE_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(rank: int, world_size: int, port: int, tasks: mp.Queue, results: mp.Queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
    results.put((rank, "ready", None))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, "ok", fn(*args, **kwargs)))
        except BaseException:  # report everything, including assertion errors, to the parent
            results.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class WorkerPool:
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        port = free_port()
        self.procs = [
            ctx.Process(
                target=_worker_main, args=(r, world_size, port, self.tasks[r], self.results), daemon=True
            )
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()
        self._collect("start-up", timeout=120)

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 180, **kwargs: Any) -> list[Any]:
        for q in self.tasks:
            q.put((fn, args, kwargs))
        return self._collect(getattr(fn, "__name__", str(fn)), timeout)

    def _collect(self, what: str, timeout: float) -> list[Any]:
        answers: dict[int, tuple[str, Any]] = {}
        errors: dict[int, str] = {}
        while len(answers) < self.world_size:
            wait = GRACE_AFTER_FAILURE_S if errors else timeout
            try:
                rank, status, value = self.results.get(timeout=wait)
            except queue.Empty:
                silent = sorted(set(range(self.world_size)) - set(answers))
                self.close(kill=True)
                details = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
                if errors:
                    raise AssertionError(
                        f"{what}: ranks {sorted(errors)} failed; ranks {silent} hung{details}"
                    ) from None
                raise AssertionError(
                    f"{what}: ranks {silent} did not finish within {timeout:.0f}s (hang?)"
                ) from None
            answers[rank] = (status, value)
            if status == "error":
                errors[rank] = value
        if errors:
            details = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise AssertionError(f"{what}: ranks {sorted(errors)} failed{details}")
        return [answers[r][1] for r in range(self.world_size)]

    def close(self, kill: bool = False) -> None:
        if not kill:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=10)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


_POOLS: dict[int, WorkerPool] = {}


def get_pool(world_size: int) -> WorkerPool:
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive:
        if pool is not None:
            pool.close(kill=True)
        _POOLS[world_size] = pool = WorkerPool(world_size)
    return pool


def close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


def run_distributed(
    world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 180, **kwargs: Any
) -> list[Any]:
    """Run `fn(*args, **kwargs)` on every rank of a pooled gloo world of `world_size`; results in rank
    order. Tests pass the case's settings by keyword, so a call reads as the case it runs."""
    return get_pool(world_size).run(fn, *args, timeout=timeout, **kwargs)


class grid:
    """`with grid(dp=2, tp=2) as topo:` builds the (pp, dp, cp, tp) groups (and ep's) on a pooled worker,
    then frees them."""

    def __init__(self, dp: int = 1, tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1) -> None:
        self.dims = dict(dp=dp, tp=tp, pp=pp, cp=cp, ep=ep)

    def __enter__(self):
        from parallel import ParallelDims, init_distributed

        self.topology = init_distributed(ParallelDims(**self.dims))
        return self.topology

    def __exit__(self, *exc) -> None:
        from parallel import destroy_distributed

        destroy_distributed(self.topology)
