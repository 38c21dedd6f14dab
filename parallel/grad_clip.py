"""Global gradient-norm clipping over a model sharded by tensor (and later pipeline) parallelism.

    ||g||^2 = sum over TP-sharded parameters of (all-reduce over tp of the local ||g_i||^2)
            + sum over replicated parameters of ||g_i||^2            (counted once, not tp times)

then summed over pipeline stages (each holds different parameters). Data-parallel replicas hold the same
averaged gradients and need no reduction. Under expert parallelism the routed experts' parameters
(`is_expert_parameter`) differ between the ranks of the expert-parallel group, so their part is summed
over `ep_group` (each expert once; its expert-data-parallel replicas are identical and not counted):

    ||g||^2 = [tp-summed dense part] + all-reduce over ep of [tp-summed expert part]

Every rank ends with the same norm, so every rank applies the same scale min(1, max_norm / (||g|| + 1e-6)).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from parallel.collectives import group_size
from parallel.experts import is_expert_parameter
from parallel.tensor import tp_dim


def global_grad_norm(
    params: Iterable[torch.nn.Parameter],
    tp_group: dist.ProcessGroup | None = None,
    pp_group: dist.ProcessGroup | None = None,
    ep_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """The L2 norm of the full model's gradient (fp32 scalar), identical on every rank."""
    # squares by (TP-sharded, expert): [dense sharded, expert sharded, dense replicated, expert replicated]
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    expert_split = group_size(ep_group) > 1
    for p in params:
        if p.grad is not None:
            parts[2 * (tp_dim(p) is None) + (expert_split and is_expert_parameter(p))].append(p.grad)
    grads = [g for part in parts for g in part]
    device = grads[0].device if grads else torch.device("cpu")
    zero = torch.zeros((), dtype=torch.float32, device=device)
    sq = torch.stack(
        [torch.stack([g.float().pow(2).sum() for g in part]).sum() if part else zero for part in parts]
    )
    if group_size(tp_group) > 1:
        dist.all_reduce(sq[0:2], group=tp_group)
    dense, expert = sq[0] + sq[2], sq[1] + sq[3]
    if expert_split:
        dist.all_reduce(expert, group=ep_group)
    total = dense + expert
    if group_size(pp_group) > 1:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


def clip_grad_norm_(
    params: Iterable[torch.nn.Parameter],
    max_norm: float,
    tp_group: dist.ProcessGroup | None = None,
    pp_group: dist.ProcessGroup | None = None,
    ep_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Scale gradients in place so the global norm is at most `max_norm`; returns the norm before."""
    params = [p for p in params if p.grad is not None]
    norm = global_grad_norm(params, tp_group, pp_group, ep_group)
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_([p.grad for p in params], scale)
    return norm
