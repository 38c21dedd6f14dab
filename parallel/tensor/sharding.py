"""How tensor-parallel parameters are split, and the helpers that shard and rebuild full tensors.

A tensor of size N along a dimension is split over p ranks in contiguous chunks of ceil(N / p); when p
does not divide N the last chunks are zero-padded, so every rank holds the same shape:

    rank r holds rows [r * ceil(N/p), (r + 1) * ceil(N/p)) of the full tensor, padding past N.

Every sharded parameter records how it is split (`tp_dim`, `tp_full_size`), so a full tensor can be
sharded (`shard_tensor`) or rebuilt (`gather_tensor`) for any TP size: initialisation, checkpoints and
tests all work on full tensors and stay layout-independent. Activations are (batch, seq, hidden);
sequence parallelism splits them along `SEQUENCE_DIM`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from parallel.collectives import group_size

SEQUENCE_DIM = 1  # activations are (batch, seq, hidden)


def mark_sharded(param: nn.Parameter, dim: int, full_size: int) -> nn.Parameter:
    """Record that `param` holds one of tp equal chunks of a tensor of `full_size` along `dim`."""
    param.tp_dim = dim
    param.tp_full_size = full_size
    return param


def tp_dim(param: torch.Tensor) -> int | None:
    """The dimension along which `param` is sharded over the TP group, or None when replicated."""
    return getattr(param, "tp_dim", None)


def shard_size(full_size: int, world: int) -> int:
    """Rows per rank when `full_size` rows are split over `world` ranks (padded up to a multiple)."""
    return math.ceil(full_size / world)


def shard_tensor(full: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    """This rank's chunk of `full` along `dim`, zero-padded when the size does not divide."""
    per = shard_size(full.shape[dim], world)
    start = min(rank * per, full.shape[dim])
    piece = full.narrow(dim, start, max(0, min(per, full.shape[dim] - start)))
    if piece.shape[dim] < per:
        pad_shape = list(full.shape)
        pad_shape[dim] = per - piece.shape[dim]
        piece = torch.cat([piece, full.new_zeros(pad_shape)], dim=dim)
    return piece.contiguous()


def gather_tensor(
    local: torch.Tensor, dim: int, full_size: int, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Rebuild the full tensor from every rank's chunk (inverse of `shard_tensor`); not autograd-aware."""
    world = group_size(group)
    if world > 1:
        chunks = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(chunks, local.contiguous(), group=group)
        local = torch.cat(chunks, dim=dim)
    return local.narrow(dim, 0, full_size)


def full_tensor(param: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The full (unsharded) value of a parameter or gradient-shaped tensor attached to `param`'s layout."""
    dim = tp_dim(param)
    return param.detach() if dim is None else gather_tensor(param.detach(), dim, param.tp_full_size, group)
