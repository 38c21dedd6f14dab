"""The ring alternative to the all-gather (`exchange.py`), kept to measure against it.

Instead of gathering every rank's latents before attending, the ranks pass them around a ring: at step
k = 0 .. cp-1 rank r holds the latents (c, RoPE(k_pe)) of rank (r - k) mod cp, attends to them
(`attention.forward_block`, the same log-sum-exp merge) while the next block is already in flight
(isend to r + 1, irecv from r - 1). Backward passes the latents around again, and behind each block the
gradient accumulator of its tokens: every rank adds what its queries contribute and sends it on, and
after the last step it reaches the owner, which adds its own share (flash attention's backward per
block, as in `attention.py`). Forward moves the all-gather's bytes ((cp - 1)/cp of the sequence per
rank); backward moves them again plus as many accumulator bytes (fp32), where the all-gather's backward
is one reduce-scatter. What the ring buys is hiding the transfers behind attention, and keeping only the
local latents for backward instead of the gathered ones.

The measurement (benchmarks/bench_context_parallel.py, benchmarks/RESULTS.md) decides which path MLA
uses; see docs/long-context.md.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.context.attention import Plan, _accumulate, backward_block, forward_block
from parallel.context.shard import ContextShard


def _shift(tensor: torch.Tensor, shard: ContextShard, tag: int = 0):
    """Start sending `tensor` to the next rank of the ring and receiving the previous rank's; returns
    (buffer, works): the buffer holds the received tensor once every work has been waited on. Latents
    and gradient accumulators travel with different tags, so they can be in flight together."""
    cp, rank = shard.size, shard.rank
    nxt = dist.get_global_rank(shard.group, (rank + 1) % cp)
    prv = dist.get_global_rank(shard.group, (rank - 1) % cp)
    buffer = torch.empty_like(tensor)
    ops = [
        dist.P2POp(dist.isend, tensor, nxt, shard.group, tag),
        dist.P2POp(dist.irecv, buffer, prv, shard.group, tag),
    ]
    return buffer, dist.batch_isend_irecv(ops)


def _wait(works) -> None:
    for work in works:
        work.wait()


def _ring_forward(plan: Plan, query, held, rank_dim: int, weight):
    """Output and LSE of the local queries, the latents `held` (batch, 2 pieces, r + d_rope) passed round."""
    cp, rank = plan.shard.size, plan.shard.rank
    outs, lses = [None, None], [None, None]
    for step in range(cp):
        incoming = _shift(held.contiguous(), plan.shard) if step < cp - 1 else None
        source = (rank - step) % cp
        latent, k_rope = held.split([rank_dim, held.shape[-1] - rank_dim], dim=-1)
        for local in (0, 1):
            forward_block(plan, 2 * source + local, local, query, latent, k_rope, weight, outs, lses)
        if incoming is not None:
            _wait(incoming[1])
            held = incoming[0]
    return torch.cat(outs, dim=2).to(query.dtype), torch.cat(lses, dim=2)


def _ring_backward(plan: Plan, grad_out, query, own, rank_dim: int, weight, out, lse):
    """Gradients of (query, own latents, weight). At step k >= 1 the gradient of the block in hand (plus
    what the ranks before added, received meanwhile) is sent on; after step cp - 1 it reaches its owner,
    which adds its own step-0 share: cp - 1 sends of latents and cp - 1 of accumulators."""
    acc = _accumulate(query.dtype)
    cp, rank = plan.shard.size, plan.shard.rank
    delta = (grad_out.to(acc) * out.to(acc)).sum(-1)
    d_query = torch.zeros_like(query, dtype=acc)
    d_weight = torch.zeros_like(weight, dtype=acc)
    held, d_own, travelling = own, None, None
    for step in range(cp):
        incoming = _shift(held.contiguous(), plan.shard) if step < cp - 1 else None
        source = (rank - step) % cp
        latent, k_rope = held.split([rank_dim, held.shape[-1] - rank_dim], dim=-1)
        saved = (query, latent, k_rope, weight, lse)
        d_held = torch.zeros_like(own, dtype=acc)
        for local in (0, 1):
            block = 2 * source + local
            if plan.users(block):
                d_c, d_pe = backward_block(plan, block, local, saved, grad_out, delta, d_query, d_weight)
                d_held[:, plan.rows(local)] += torch.cat([d_c, d_pe], dim=-1)
        if step == 0:
            d_own = d_held
        else:
            if travelling is not None:  # what the previous ranks added to this block
                _wait(travelling[1])
                d_held += travelling[0]
            travelling = _shift(d_held, plan.shard, tag=1)
        if incoming is not None:
            _wait(incoming[1])
            held = incoming[0]
    if travelling is not None:
        _wait(travelling[1])
        d_own += travelling[0]
    return d_query, d_own, d_weight


class _RingLatentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, latent, k_rope, weight, plan: Plan):
        dtypes = [t.dtype for t in (query, latent, k_rope, weight)]
        with torch.autocast(query.device.type, enabled=False):
            dtype = query.dtype
            own = torch.cat([latent.to(dtype), k_rope.to(dtype)], dim=-1)
            weight = weight.to(dtype)
            out, lse = _ring_forward(plan, query, own, latent.shape[-1], weight)
        ctx.save_for_backward(query, own, weight, out, lse)
        ctx.plan, ctx.dtypes, ctx.rank_dim = plan, dtypes, latent.shape[-1]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, own, weight, out, lse = ctx.saved_tensors
        with torch.autocast(grad_out.device.type, enabled=False):
            d_query, d_own, d_weight = _ring_backward(
                ctx.plan, grad_out, query, own, ctx.rank_dim, weight, out, lse
            )
        d_latent, d_rope = d_own.split([ctx.rank_dim, d_own.shape[-1] - ctx.rank_dim], dim=-1)
        grads = (d_query, d_latent, d_rope, d_weight)
        return (*(g.to(d) for g, d in zip(grads, ctx.dtypes, strict=True)), None)


def ring_latent_attention(
    query: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    kv_weight: torch.Tensor,
    shard: ContextShard,
    scale: float,
    d_nope: int,
) -> torch.Tensor:
    """`attention.latent_attention` with this rank's own latents (batch, s_local, ...) passed round a ring
    instead of gathered beforehand; the same result up to the order of the LSE merge."""
    local = query.shape[2]
    if local % 2 or latent.shape[1] != local:
        raise ValueError(f"{local} local queries and {latent.shape[1]} local latents: expected equal, even")
    return _RingLatentAttention.apply(
        query, latent, k_rope, kv_weight, Plan(shard, local // 2, scale, d_nope)
    )
