"""Global gradient-norm clipping over a model sharded by tensor (and later pipeline) parallelism.

    ||g||^2 = sum over TP-sharded parameters of (all-reduce over tp of the local ||g_i||^2)
            + sum over replicated parameters of ||g_i||^2            (counted once, not tp times)

then summed over pipeline stages (each holds different parameters). Data-parallel replicas hold the same
averaged gradients and need no reduction. Every rank ends with the same norm, so every rank applies the
same scale min(1, max_norm / (||g|| + 1e-6)).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from parallel.collectives import group_size
from parallel.tensor import tp_dim


def global_grad_norm(
    params: Iterable[torch.nn.Parameter],
    tp_group: dist.ProcessGroup | None = None,
    pp_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """The L2 norm of the full model's gradient (fp32 scalar), identical on every rank."""
    sharded, replicated = [], []
    for p in params:
        if p.grad is not None:
            (replicated if tp_dim(p) is None else sharded).append(p.grad)
    device = (sharded or replicated)[0].device if (sharded or replicated) else torch.device("cpu")
    sq_sharded = torch.zeros((), dtype=torch.float32, device=device)
    sq_replicated = torch.zeros((), dtype=torch.float32, device=device)
    if sharded:
        sq_sharded = torch.stack([g.float().pow(2).sum() for g in sharded]).sum()
    if replicated:
        sq_replicated = torch.stack([g.float().pow(2).sum() for g in replicated]).sum()
    if group_size(tp_group) > 1:
        dist.all_reduce(sq_sharded, group=tp_group)
    total = sq_sharded + sq_replicated
    if group_size(pp_group) > 1:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


def clip_grad_norm_(
    params: Iterable[torch.nn.Parameter],
    max_norm: float,
    tp_group: dist.ProcessGroup | None = None,
    pp_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Scale gradients in place so the global norm is at most `max_norm`; returns the norm before."""
    params = [p for p in params if p.grad is not None]
    norm = global_grad_norm(params, tp_group, pp_group)
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_([p.grad for p in params], scale)
    return norm
