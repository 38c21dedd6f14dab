"""Token dispatch for expert parallelism: all-to-all to the ranks owning the chosen experts, and back.

E routed experts are split over the P ranks of the expert-parallel group in contiguous blocks: rank q
holds the global experts [q E/P, (q + 1) E/P) (`local_expert_range`). Each rank routes its own T tokens
(k choices each), so it has T k (token, expert) pairs. Dispatch, on every rank:

    order      = stable argsort of the pairs by global expert       (so by owning rank, then local expert)
    c[e]       = pairs of this rank choosing expert e               (E counts)
    r[s, l]    = all_to_all(c)[s, l]: pairs rank s sends to local expert l here   (one small all-to-all)
    recv       = all_to_all(x[order // k], in_splits = sum_l c[q, l], out_splits = sum_l r[s, l])
    grouped    = recv reordered by local expert (rows of one source stay in their order)

so local expert l sees sum_s r[s, l] rows, in one contiguous block. Combine is the reverse: undo the
grouping, all-to-all with the splits swapped, and the outputs arrive in `order`, one per pair; the caller
weighs them by the router weights and adds them into their tokens. Nothing is dropped or padded: the
splits are exchanged first, so every rank knows how much it receives (dropless).

Autograd: y = A x with A the all-to-all permutation of rows between ranks; its adjoint is the all-to-all
with input and output splits swapped, so `all_to_all`'s backward sends each row's gradient back to the
rank it came from. A rank that sends or receives nothing still takes part, so the collectives of all
ranks match whatever the routing.

The bytes moved per rank and step: (pairs whose expert is on another rank) x h x element size, each way,
in forward; the same again in backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.collectives import group_rank, group_size


def local_expert_range(num_experts: int, group: dist.ProcessGroup | None) -> range:
    """The global indices of the experts this rank holds: a contiguous block of E / P."""
    world = group_size(group)
    if num_experts % world:
        raise ValueError(
            f"model.n_routed_experts={num_experts} is not divisible by distributed.ep={world}: experts are "
            "split evenly over the expert-parallel ranks"
        )
    per = num_experts // world
    return range(group_rank(group) * per, (group_rank(group) + 1) * per)


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Rows [sum in_splits[:j], +in_splits[j]) go to rank j; rows from rank j land in block j of the
    output (out_splits[j] rows). Autograd-aware (backward: the same exchange with the splits swapped);
    the identity on a group of one rank."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


@dataclass
class DispatchPlan:
    """What combine needs to send the expert outputs back: the pair order, the splits, the grouping."""

    order: torch.Tensor  # pair indices sorted by global expert: outputs come back in this order
    in_splits: list[int]  # rows sent to each rank
    out_splits: list[int]  # rows received from each rank
    regroup: torch.Tensor  # received row of each grouped row
    counts: list[int]  # rows per local expert, in the grouped layout


def dispatch(
    x: torch.Tensor, indices: torch.Tensor, num_experts: int, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, DispatchPlan]:
    """Send each (token, expert) pair's row of `x` (T, h) to the rank owning the expert (`indices` (T, k),
    global ids). Returns the rows this rank's experts must process, grouped by local expert (block sizes
    `plan.counts`), and the plan for `combine`."""
    world, k = group_size(group), indices.shape[1]
    local = num_experts // world
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    sent = torch.bincount(flat, minlength=num_experts)
    rows = x[order // k]
    if world == 1:
        plan = DispatchPlan(order, [rows.shape[0]], [rows.shape[0]], None, sent.tolist())
        return rows, plan
    received = _all_to_all(sent, [local] * world, [local] * world, group).view(world, local)
    in_splits = sent.view(world, local).sum(1).tolist()
    out_splits = received.sum(1).tolist()
    recv = all_to_all(rows, out_splits, in_splits, group)
    expert_of_row = torch.arange(local, device=x.device).repeat(world).repeat_interleave(received.reshape(-1))
    regroup = torch.argsort(expert_of_row, stable=True)
    counts = received.sum(0).tolist()
    return recv[regroup], DispatchPlan(order, in_splits, out_splits, regroup, counts)


def combine(y: torch.Tensor, plan: DispatchPlan, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The experts' outputs (grouped as `dispatch` returned them) back on the ranks that sent the rows,
    one per (token, expert) pair in `plan.order`."""
    if plan.regroup is None:
        return y
    ungrouped = torch.empty_like(y).index_copy(0, plan.regroup, y)
    return all_to_all(ungrouped, plan.in_splits, plan.out_splits, group)
