"""RunContext: where this run executes — one process, or one rank of a torchrun world — and its layout.

The choice comes from the environment (torchrun sets RANK and WORLD_SIZE) and the `distributed` section
of the config; one log line on rank 0 says which was chosen and why. Layout rules when the config leaves
sizes open: `tp` defaults to 1 (data parallelism is the cheapest way to use more ranks for a model that
fits), and `dp` is whatever is left of the world size.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch

from parallel.topology import ParallelDims, Topology, destroy_distributed, init_distributed
from train.config import Config, ConfigError


@dataclass
class RunContext:
    topology: Topology
    description: str

    @property
    def rank(self) -> int:
        return self.topology.rank

    @property
    def is_main(self) -> bool:
        return self.topology.rank == 0

    @property
    def device(self) -> torch.device:
        return self.topology.device

    def log(self, message: str) -> None:
        """Print on global rank 0 only."""
        if self.is_main:
            print(message, flush=True)

    def barrier(self) -> None:
        self.topology.barrier()

    def close(self) -> None:
        destroy_distributed(self.topology)

    @classmethod
    def from_config(cls, config: Config) -> RunContext:
        """Build the topology the config and the environment ask for; errors name the config key."""
        dist_cfg = config.distributed
        launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        world = int(os.environ.get("WORLD_SIZE", "1")) if launched else 1
        tp, pp, cp, ep = dist_cfg.tp or 1, dist_cfg.pp, dist_cfg.cp, dist_cfg.ep
        if world % (tp * pp * cp):
            raise ConfigError(
                f"distributed.tp={tp} x distributed.pp={pp} x distributed.cp={cp} does not divide the world "
                f"size {world}"
            )
        dp = dist_cfg.dp or world // (tp * pp * cp)
        if dp * cp * tp * pp != world:
            needed = dp * cp * tp * pp
            hint = "" if launched else f" (launch with: torchrun --nproc-per-node {needed} ...)"
            raise ConfigError(
                f"distributed: dp*cp*tp*pp = {dp}*{cp}*{tp}*{pp} = {needed} does not equal the world size "
                f"{world}{hint}"
            )
        if dp % ep:
            raise ConfigError(
                f"distributed.ep={ep} does not divide dp={dp}: expert-parallel ranks are carved out of the "
                "data-parallel ranks"
            )
        backend = None if dist_cfg.backend == "auto" else dist_cfg.backend
        # long while starting (one rank may build the data while the others wait); the trainer sets
        # `timeout_s` once the first step is done
        timeout = dist_cfg.startup_timeout_s  # >= timeout_s (train/config.py checks)
        topology = init_distributed(ParallelDims(dp=dp, tp=tp, pp=pp, cp=cp, ep=ep), backend, timeout)
        if topology.is_distributed:
            why = "torchrun environment (RANK/WORLD_SIZE set)"
            how = f"distributed: {world} ranks over {topology.backend}"
        else:
            why = "no torchrun environment (RANK/WORLD_SIZE unset)"
            how = "single process"
        layout = (
            f"dp={dp} tp={tp} pp={pp}" + (f" cp={cp}" if cp > 1 else "") + (f" ep={ep}" if ep > 1 else "")
        )
        if dist_cfg.dp is None and dist_cfg.tp is None and pp == 1 and cp == 1 and world > 1:
            layout += (
                f" (chosen from world size {world}: data parallel; set distributed.tp to shard the model)"
            )
        description = f"{how} on {topology.device}, {layout} — {why}"
        context = cls(topology=topology, description=description)
        context.log(description)
        return context


def fail(message: str, code: int = 2, every_rank: bool = True) -> None:
    """Print a one-line error and exit: once per rank, prefixed with the rank on all but rank 0 (an
    error met by one rank alone is then never lost); `every_rank=False` for errors every rank meets
    alike (configuration, agreed decisions), printed by rank 0 alone.

    The other ranks wait a moment before exiting: torchrun stops the whole world when the first process
    exits, and rank 0 must have printed by then."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    else:
        if every_rank:
            print(f"error: [rank {rank}] {message}", file=sys.stderr, flush=True)
        time.sleep(3)
    sys.exit(code)
