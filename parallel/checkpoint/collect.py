"""Save side of re-sharding: what one rank alone writes, as named slices of global tensors.

Who writes what (parallel/checkpoint/slices.py has the names and the piece records): replicated tensors
by TP rank 0 only; parameters and plain optimizer state by replica 0 only (dp x cp replicas are identical);
ZeroOptimizer state by every dp rank, its own chunk of every bucket, as flat pieces per parameter, so no
gather happens at save time and each rank writes its 1/N share. AdamW8bit state is written as 8-bit
units: every TP rank its own codes (a ZeRO chunk may mix replicated and sharded parameters).

Expert parallelism: a routed expert's parameters (global names, `experts.{j}`) and their plain optimizer
state are written by the ranks of expert-data-parallel index 0 (edp index 0: one rank
per expert-parallel rank), so each expert is written once; ZeRO expert buckets, sharded over the
expert-data-parallel group, by every rank, its own chunk (kept whole at stage 0: index 0 only).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from parallel.checkpoint.slices import (
    UNIT_FIELDS,
    chunk_segments,
    clip,
    global_shape,
    named_parameters,
    param_segment,
    region,
)
from parallel.data import ZeroOptimizer
from parallel.experts import is_expert_parameter
from parallel.tensor import tp_dim


class RankState:
    """What one rank writes: tensors by key (its shard file) and the records that name them."""

    def __init__(self, tp_rank: int) -> None:
        self.tp_rank = tp_rank
        self.tensors: dict[str, torch.Tensor] = {}
        self.pieces: list[dict] = []
        self.units: list[dict] = []
        self.steps: dict[str, float] = {}

    def _add(self, name: str, data: torch.Tensor, shape: list[int], piece: dict) -> None:
        if name in self.tensors:
            raise ValueError(f"checkpoint: {name} written twice by one rank")
        self.tensors[name] = data.detach().to("cpu", copy=True).contiguous()
        dtype = str(data.dtype).removeprefix("torch.")
        self.pieces.append({"name": name, "key": name, "shape": shape, "dtype": dtype, **piece})

    def dense(self, name: str, value: torch.Tensor, p: torch.Tensor) -> None:
        shape = global_shape(value.shape, p)
        index = clip(region(value.shape, p, self.tp_rank), shape)
        sizes = [b - a for a, b in index]
        if any(s <= 0 for s in sizes):
            return  # this rank holds only TP padding
        self._add(name, value[tuple(slice(0, s) for s in sizes)], shape, {"index": index})

    def flat(self, name: str, data: torch.Tensor, p: torch.Tensor, local_shape, lo: int, hi: int) -> None:
        index = region(local_shape, p, self.tp_rank)
        self._add(name, data, global_shape(local_shape, p), {"index": index, "flat": [lo, hi]})

    def unit(self, state: dict, block_size: int, numel: int, segments: list[dict]) -> None:
        keys = {}
        for field in UNIT_FIELDS:
            keys[field] = f"unit{len(self.units)}/{field}"
            self.tensors[keys[field]] = state[field].detach().to("cpu", copy=True)
        self.units.append({"keys": keys, "block_size": block_size, "numel": numel, "segments": segments})


def _moments(state: dict, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """The floating-point state tensors shaped like the parameter (not the step, not 8-bit codes)."""
    return {
        k: v
        for k, v in state.items()
        if k != "step"
        and k not in UNIT_FIELDS
        and torch.is_tensor(v)
        and v.is_floating_point()
        and v.shape == like.shape
    }


def collect(
    chunks: Sequence[nn.Module],
    optimizer: torch.optim.Optimizer | None,
    tp_rank: int,
    replica_rank: int,
    expert_replica_rank: int | None = None,
) -> RankState:
    """Everything this rank alone must write (see the module docstring for who writes what).

    `replica_rank` is this rank's index among the ranks holding the same dense parameters (the dp x cp
    group), `expert_replica_rank` its index among those holding the same experts (the
    expert-data-parallel group; None: the same as `replica_rank`)."""
    out, names = RankState(tp_rank), named_parameters(chunks)
    expert_replica_rank = replica_rank if expert_replica_rank is None else expert_replica_rank

    def writes(p: torch.Tensor) -> bool:  # the one replica that writes p
        return (expert_replica_rank if is_expert_parameter(p) else replica_rank) == 0

    zero = optimizer if isinstance(optimizer, ZeroOptimizer) else None
    for p, name in names.items():
        if (
            (zero is None or p not in zero.bucket_of)
            and writes(p)
            and (tp_dim(p) is not None or tp_rank == 0)
        ):
            out.dense(f"param/{name}", p.detach(), p)
    if zero is not None:
        group_of = {m: g for g in zero.inner.param_groups for m in g["params"]}
        for bucket, master in zip(zero.buckets, zero.masters, strict=True):
            if bucket.shards == 1 and not writes(bucket.params[0]):  # stage 0 keeps buckets whole
                continue
            state = zero.inner.state.get(master, {})
            segments = chunk_segments(bucket, names, tp_rank)
            for key, value in {"master": master, **_moments(state, master)}.items():
                for p, seg in segments:
                    if not seg["replica"]:
                        piece = value[seg["offset"] : seg["offset"] + seg["flat"][1] - seg["flat"][0]]
                        out.flat(f"optim/{seg['name']}/{key}", piece, p, bucket.shapes[p], *seg["flat"])
            if "state1" in state:  # every rank its own blocks (they may span replicated parameters)
                out.unit(state, group_of[master]["block_size"], master.numel(), [s for _, s in segments])
            if "step" in state:
                out.steps.update({seg["name"]: float(state["step"]) for _, seg in segments})
    elif optimizer is not None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state.get(p)
                if not state or not writes(p):
                    continue
                segment = param_segment(names[p], p, tp_rank)
                if "state1" in state:  # every TP rank its own codes: each restores exactly what it had
                    out.unit(state, group["block_size"], p.numel(), [segment])
                if segment["replica"]:
                    continue
                for key, value in _moments(state, p).items():
                    out.dense(f"optim/{names[p]}/{key}", value, p)
                if "step" in state:
                    out.steps[names[p]] = float(state["step"])
    return out
