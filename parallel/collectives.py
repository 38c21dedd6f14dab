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

import torch
import torch.distributed as dist


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


def _split(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(f"cannot split dimension {dim} of size {x.shape[dim]} evenly over {world} ranks")
    return x.chunk(world, dim=dim)[group_rank(group)].contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(f"cannot reduce-scatter dimension {dim} of size {x.shape[dim]} over {world} ranks")
    if dist.get_backend(group) == "gloo":
        # gloo has no reduce_scatter: sum everything, keep this rank's chunk (same result, more bytes).
        return _split(_all_reduce(x.clone(), group), dim, group)
    chunks = [c.contiguous() for c in x.chunk(world, dim=dim)]
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=group)
    return out


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.dim, ctx.group), None, None


class _SplitToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


class _ReduceScatterToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


class _GatherFromSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.dim, ctx.group), None, None


def copy_to_group(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Identity forward; all-reduce (sum) of the gradient backward."""
    return x if group_size(group) == 1 else _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-reduce (sum) forward; identity backward."""
    return x if group_size(group) == 1 else _ReduceFromGroup.apply(x, group)


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
