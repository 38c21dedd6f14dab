"""Autograd-aware collectives for Megatron-style tensor (and sequence) parallelism.

Each op is a pair of conjugate maps, one in forward and its adjoint in backward:

    copy_to_group           forward: identity            backward: all-reduce (sum)
    reduce_from_group       forward: all-reduce (sum)    backward: identity
    gather_from_group(d)    forward: all-gather along d  backward: keep own chunk along d
    split_to_group(d)       forward: keep own chunk      backward: all-gather along d
    reduce_scatter_to_group(d)   forward: reduce-scatter along d   backward: all-gather along d
    gather_from_sequence_parallel(d)  forward: all-gather along d  backward: reduce-scatter along d

`copy_to_group` marks where a replicated activation enters a sharded computation: every rank computes a
partial derivative with respect to the same tensor, and the true gradient is their sum.
With `group=None` (or a group of size 1) every op is the identity, so layers run unchanged in one process.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

_Op = Callable[[torch.Tensor, int | None, "dist.ProcessGroup | None"], torch.Tensor]  # (x, dim, group)


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    chunks = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(chunks, x, group=group)
    return torch.cat(chunks, dim=dim)


def _divisible_world(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None, what: str) -> int:
    """The group's size, once `x` is known to split along `dim` into that many equal chunks."""
    world = group_size(group)
    if x.shape[dim] % world:
        raise ValueError(f"cannot {what} dimension {dim} of size {x.shape[dim]} over {world} ranks")
    return world


def _split(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    world = _divisible_world(x, dim, group, "split")
    if world == 1:
        return x
    return x.chunk(world, dim=dim)[group_rank(group)].contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    world = _divisible_world(x, dim, group, "reduce-scatter")
    if world == 1:
        return x
    if dist.get_backend(group) == "gloo":
        # gloo has no reduce_scatter: sum everything, keep this rank's chunk (same result, more bytes).
        return _split(_all_reduce(x.clone(), group), dim, group)
    chunks = [c.contiguous() for c in x.chunk(world, dim=dim)]
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=group)
    return out


def _view(x: torch.Tensor, dim: int | None, group: dist.ProcessGroup | None) -> torch.Tensor:
    return x.view_as(x)


def _keep(x: torch.Tensor, dim: int | None, group: dist.ProcessGroup | None) -> torch.Tensor:
    return x


def _sum(x: torch.Tensor, dim: int | None, group: dist.ProcessGroup | None) -> torch.Tensor:
    return _all_reduce(x.clone(), group)


def _conjugate_pair(name: str, forward_op: _Op, backward_op: _Op) -> type[torch.autograd.Function]:
    """The autograd function `forward_op(x, dim, group)` whose backward is `backward_op(grad, dim, group)`."""

    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return forward_op(x, dim, group)

    def backward(ctx, grad):
        return backward_op(grad, ctx.dim, ctx.group), None, None

    methods = {"forward": staticmethod(forward), "backward": staticmethod(backward)}
    return type(name, (torch.autograd.Function,), methods)


_CopyToGroup = _conjugate_pair("_CopyToGroup", _view, _sum)
_ReduceFromGroup = _conjugate_pair("_ReduceFromGroup", _sum, _keep)
_GatherFromGroup = _conjugate_pair("_GatherFromGroup", _all_gather, _split)
_SplitToGroup = _conjugate_pair("_SplitToGroup", _split, _all_gather)
_ReduceScatterToGroup = _conjugate_pair("_ReduceScatterToGroup", _reduce_scatter, _all_gather)
_GatherFromSequenceParallel = _conjugate_pair("_GatherFromSequenceParallel", _all_gather, _reduce_scatter)


def copy_to_group(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Identity forward; all-reduce (sum) of the gradient backward."""
    return x if group_size(group) == 1 else _CopyToGroup.apply(x, None, group)


def reduce_from_group(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-reduce (sum) forward; identity backward."""
    return x if group_size(group) == 1 else _ReduceFromGroup.apply(x, None, group)


def gather_from_group(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` forward; keep this rank's chunk of the gradient backward."""
    return x if group_size(group) == 1 else _GatherFromGroup.apply(x, dim, group)


def split_to_group(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Keep this rank's chunk along `dim` forward; all-gather the gradient backward."""
    return x if group_size(group) == 1 else _SplitToGroup.apply(x, dim, group)


def reduce_scatter_to_group(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum over ranks and keep this rank's chunk along `dim` forward; all-gather the gradient backward."""
    return x if group_size(group) == 1 else _ReduceScatterToGroup.apply(x, dim, group)


def gather_from_sequence_parallel(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-gather along `dim` forward; reduce-scatter the gradient backward (sequence parallelism)."""
    return x if group_size(group) == 1 else _GatherFromSequenceParallel.apply(x, dim, group)
