"""A rank's training state as named slices of global tensors: the names and records of checkpoints.

Every tensor is named by what it is, never by where it lived (parameter names carry global layer
indices, so they do not depend on the pipeline split):

    param/<parameter>                  a weight; under ZeroOptimizer only the frozen ones (see master)
    optim/<parameter>/master           ZeroOptimizer's fp32 master weight; preferred over param/ on load
    optim/<parameter>/<state>          optimizer state shaped like the parameter (exp_avg, exp_avg_sq)
    optim steps                        the per-parameter step count (a number, in the manifest)

A rank's local tensor is a rectangular *region* of the global one: all of it when replicated over TP,
rows (or columns) [r*k, (r+1)*k) on TP rank r when sharded along that dimension (k = the local size; the
last rank's region may run past the global shape where `shard_tensor` zero-padded it). A rank records
what it writes as

    dense piece   {"index": region clipped to the global shape}    the slice itself
    flat piece    {"index": region, "flat": [lo, hi]}              elements lo..hi of the region, flattened
    8-bit unit    {"segments": [{name, shape, index, flat, offset}], "block_size", "numel"}

so that every element is written exactly once (parallel/checkpoint/collect.py says who writes what) and
any region can be read back under another layout (parallel/checkpoint/reshard.py).

AdamW8bit state is stored as it lives in memory: codes and absmax per block of one optimizer tensor (a
parameter's local shard, or a ZeRO chunk spanning several parameters), with the segments saying which
parameter elements the blocks cover, so the checkpoint costs 2.03 bytes per parameter, like the state.
The manifest also lists those segments as pieces of `optim/<parameter>/exp_avg` and `exp_avg_sq`, whose
values are the dequantized codes; replicated segments are marked `replica` on TP ranks other than 0, so
their dequantized pieces come from TP rank 0 only. Moments saved by AdamW and by AdamW8bit share the
names, so either optimizer resumes the other's checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from parallel.tensor import tp_dim

UNIT_FIELDS = ("state1", "absmax1", "state2", "absmax2")


def region(local_shape: Sequence[int], p: torch.Tensor, tp_rank: int) -> list[list[int]]:
    """[start, stop) per dimension of the global tensor covered by this rank's local tensor."""
    out = [[0, n] for n in local_shape]
    dim = tp_dim(p)
    if dim is not None:
        out[dim] = [tp_rank * local_shape[dim], (tp_rank + 1) * local_shape[dim]]
    return out


def global_shape(local_shape: Sequence[int], p: torch.Tensor) -> list[int]:
    out, dim = list(local_shape), tp_dim(p)
    if dim is not None:
        out[dim] = p.tp_full_size
    return out


def clip(index: list[list[int]], shape: Sequence[int]) -> list[list[int]]:
    return [[min(a, n), min(b, n)] for (a, b), n in zip(index, shape, strict=True)]


def named_parameters(chunks: Sequence[nn.Module]) -> dict[nn.Parameter, str]:
    return {p: name for chunk in chunks for name, p in chunk.named_parameters()}


def _segment(name: str, p: torch.Tensor, local_shape, lo: int, hi: int, offset: int, tp_rank: int) -> dict:
    return {
        "name": name,
        "shape": global_shape(local_shape, p),
        "index": region(local_shape, p, tp_rank),
        "flat": [lo, hi],
        "offset": offset,
    }


def param_segment(name: str, p: torch.Tensor, tp_rank: int) -> dict:
    """All of a parameter's local elements, as the one segment of a plain optimizer's 8-bit unit."""
    segment = _segment(name, p, p.shape, 0, p.numel(), 0, tp_rank)
    segment["replica"] = tp_dim(p) is None and tp_rank != 0
    return segment


def chunk_segments(bucket, names: dict, tp_rank: int) -> list[tuple[nn.Parameter, dict]]:
    """The parameters' elements inside this rank's chunk of a ZeRO bucket, in chunk order. A bucket may
    mix TP-sharded and replicated parameters; on TP ranks other than 0 the replicated ones are marked
    `replica` (TP rank 0 writes them)."""
    out = []
    for p in bucket.params:
        offset, n = bucket.offsets[p], bucket.shapes[p].numel()
        lo, hi = max(bucket.start, offset), min(bucket.start + bucket.chunk, offset + n)
        if lo < hi:
            segment = _segment(
                names[p], p, bucket.shapes[p], lo - offset, hi - offset, lo - bucket.start, tp_rank
            )
            segment["replica"] = tp_dim(p) is None and tp_rank != 0
            out.append((p, segment))
    return out
