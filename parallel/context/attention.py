"""Exact causal attention of a rank's queries against the whole sequence's latents (context parallel MLA).

Rank r holds query pieces i in {r, 2cp-1-r} (`zigzag`) and, after the exchange, the latents c and rotated
shared keys k_pe of every piece j. Per key piece it up-projects with this rank's heads of W_kvb,

    [k_nope, v]_j = c_j W_kvb           K_j = [k_nope, k_pe]_j (k_pe shared by the heads)

and attends: for each query piece i and key piece j <= i (causal by true position: pieces j > i are
skipped, j = i is lower-triangular, j < i fully visible), with `partial_attention` and the
log-sum-exp merge of `merge.py`. Document masking: also only keys of the query's document.

Memory: the autograd function saves only its inputs (queries, the gathered latents: kv_lora_rank + d_rope
numbers per token, and W_kvb), the output and its LSE (the ring, `ring.py`, keeps only local latents).
Per-head keys and values of the whole sequence never exist at once, not in forward and not in backward,
which recomputes each piece's up-projection and, from the saved (o, lse), the piece's probabilities
(flash attention's backward, `merge.py`):

    dV_j = P^T dO      dS = P (dO V_j^T - D) scale      dQ += dS K_j      dK_j = dS^T Q
    dc_j = [dk_nope, dv]_j W_kvb^T      dW_kvb += c_j^T [dk_nope, dv]_j      dk_pe_j = sum_heads dk_rope

Matmuls run in the queries' dtype (bf16 under autocast), softmax statistics and gradient accumulators
in fp32.
"""

from __future__ import annotations

import torch

from parallel.context.merge import merge_partials, partial_attention
from parallel.context.shard import ContextShard
from parallel.context.zigzag import gathered_pieces, rank_pieces


class Plan:
    """Which (query piece, key piece) pairs a rank computes, and how to slice and mask them."""

    def __init__(self, shard: ContextShard, piece: int, scale: float, d_nope: int) -> None:
        self.shard, self.piece, self.scale, self.d_nope = shard, piece, scale, d_nope
        self.query_pieces = rank_pieces(shard.rank, shard.size)

    def users(self, block: int) -> list[int]:
        """The local query blocks (0, 1) that see gathered key block `block` (none: the block is skipped)."""
        key_piece = gathered_pieces(self.shard.size)[block]
        return [a for a, query_piece in enumerate(self.query_pieces) if key_piece <= query_piece]

    def rows(self, block: int) -> slice:
        return slice(block * self.piece, (block + 1) * self.piece)

    def allowed(self, query_block: int, key_block: int, device: torch.device) -> torch.Tensor | None:
        """(batch or 1, 1, piece, piece) mask: lower-triangular on the diagonal, documents everywhere."""
        mask = None
        if self.query_pieces[query_block] == gathered_pieces(self.shard.size)[key_block]:
            mask = torch.ones(self.piece, self.piece, dtype=torch.bool, device=device).tril()[None, None]
        if self.shard.query_documents is not None:
            q = self.shard.query_documents[:, self.rows(query_block)]
            k = self.shard.key_documents[:, self.rows(key_block)]
            same = (q[:, :, None] == k[:, None, :]).unsqueeze(1)
            mask = same if mask is None else mask & same
        return mask

    def keys(self, latent, k_rope, weight, block: int, heads: int):
        """(K_j, V_j) of key block j, each (batch, heads, piece, d): the up-projected latents plus k_pe."""
        c = latent[:, self.rows(block)]
        b, p, _ = c.shape
        kv = torch.matmul(c, weight).view(b, p, heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.d_nope, kv.shape[-1] - self.d_nope], dim=-1)
        k_pe = k_rope[:, self.rows(block)].unsqueeze(1).expand(b, heads, p, k_rope.shape[-1])
        return torch.cat([k_nope, k_pe], dim=-1), v

    def scores(self, query, key, query_block: int) -> torch.Tensor:
        scores = torch.matmul(query[:, :, self.rows(query_block)], key.transpose(-1, -2))
        return scores.to(_accumulate(query.dtype)) * self.scale


def _accumulate(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics and gradient sums: fp32, or the inputs' dtype when wider (fp64 checks)."""
    return torch.promote_types(dtype, torch.float32)


def forward_block(plan: Plan, block: int, held: int, query, latent, k_rope, weight, outs, lses) -> None:
    """Fold key block `block` (gathered order), found at block `held` of `latent` / `k_rope`, into the
    running (output, LSE) of each local query block that sees it (`outs`, `lses`: two entries each)."""
    users = plan.users(block)
    if not users:
        return
    key, value = plan.keys(latent, k_rope, weight, held, query.shape[1])
    for a in users:
        scores = plan.scores(query, key, a)
        out, lse = partial_attention(scores, value, plan.allowed(a, block, query.device))
        if outs[a] is not None:
            out, lse = merge_partials(outs[a], lses[a], out, lse)
        outs[a], lses[a] = out, lse


def _forward(plan: Plan, query, latent, k_rope, weight):
    """Output (batch, heads, s_local, d_v) and fp32 LSE (batch, heads, s_local) of the local queries."""
    outs, lses = [None, None], [None, None]
    for block in range(2 * plan.shard.size):
        forward_block(plan, block, block, query, latent, k_rope, weight, outs, lses)
    return torch.cat(outs, dim=2).to(query.dtype), torch.cat(lses, dim=2)


def backward_block(plan: Plan, block: int, held: int, saved, grad_out, delta, d_query, d_weight):
    """Gradients from key block `block` (at block `held` of the latents in `saved` = (query, latent,
    k_rope, weight, lse)): adds into `d_query` and `d_weight`, returns (d_latent, d_k_rope) of the block."""
    query, latent, k_rope, weight, lse = saved
    dtype, acc = query.dtype, d_query.dtype
    key, value = plan.keys(latent, k_rope, weight, held, query.shape[1])
    d_key = torch.zeros_like(key, dtype=acc)
    d_value = torch.zeros_like(value, dtype=acc)
    for a in plan.users(block):
        rows = plan.rows(a)
        scores = plan.scores(query, key, a)
        allowed = plan.allowed(a, block, query.device)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.exp(scores - lse[:, :, rows, None]).to(dtype)
        g = grad_out[:, :, rows].to(dtype)
        d_value += torch.matmul(probs.transpose(-1, -2), g).to(acc)
        d_probs = torch.matmul(g, value.transpose(-1, -2)).to(acc)
        d_scores = (probs.to(acc) * (d_probs - delta[:, :, rows, None]) * plan.scale).to(dtype)
        d_query[:, :, rows] += torch.matmul(d_scores, key).to(acc)
        d_key += torch.matmul(d_scores.transpose(-1, -2), query[:, :, rows]).to(acc)
    d_nope, d_pe = d_key.split([plan.d_nope, d_key.shape[-1] - plan.d_nope], dim=-1)
    b, _, p, _ = d_nope.shape
    d_kv = torch.cat([d_nope, d_value], dim=-1).transpose(1, 2).reshape(b, p, -1).to(dtype)
    d_weight += torch.einsum("bpr,bpo->ro", latent[:, plan.rows(held)], d_kv).to(acc)
    return torch.matmul(d_kv, weight.transpose(0, 1)).to(acc), d_pe.sum(1)


def _backward(plan: Plan, grad_out, query, latent, k_rope, weight, out, lse):
    """Gradients of (query, latent, k_rope, weight) in fp32, one key block at a time (module docstring)."""
    acc = _accumulate(query.dtype)
    delta = (grad_out.to(acc) * out.to(acc)).sum(-1)
    d_query = torch.zeros_like(query, dtype=acc)
    d_latent = torch.zeros_like(latent, dtype=acc)
    d_rope = torch.zeros_like(k_rope, dtype=acc)
    d_weight = torch.zeros_like(weight, dtype=acc)
    saved = (query, latent, k_rope, weight, lse)
    for block in range(2 * plan.shard.size):
        if plan.users(block):
            rows = plan.rows(block)
            d_latent[:, rows], d_rope[:, rows] = backward_block(
                plan, block, block, saved, grad_out, delta, d_query, d_weight
            )
    return d_query, d_latent, d_rope, d_weight


class _LatentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, latent, k_rope, weight, plan: Plan):
        dtypes = [t.dtype for t in (query, latent, k_rope, weight)]
        with torch.autocast(query.device.type, enabled=False):
            dtype = query.dtype
            latent, k_rope, weight = latent.to(dtype), k_rope.to(dtype), weight.to(dtype)
            out, lse = _forward(plan, query, latent, k_rope, weight)
        ctx.save_for_backward(query, latent, k_rope, weight, out, lse)
        ctx.plan, ctx.dtypes = plan, dtypes
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            grads = _backward(ctx.plan, grad_out, *ctx.saved_tensors)
        return (*(g.to(d) for g, d in zip(grads, ctx.dtypes, strict=True)), None)


def latent_attention(
    query: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    kv_weight: torch.Tensor,
    shard: ContextShard,
    scale: float,
    d_nope: int,
) -> torch.Tensor:
    """Causal (and document-masked) attention of this rank's queries over every token of the sequence.

    `query` (batch, heads, s_local, d_nope + d_rope), RoPE applied; `latent` (batch, s, kv_lora_rank) and
    `k_rope` (batch, s, d_rope): the gathered latents (`exchange_latents`), in gathered order;
    `kv_weight` (kv_lora_rank, heads x (d_nope + d_v)): this rank's heads of W_kvb, so kv = latent @ it.
    Returns (batch, heads, s_local, d_v)."""
    local = query.shape[2]
    if local % 2 or latent.shape[1] != local * shard.size:
        raise ValueError(
            f"{local} local queries and {latent.shape[1]} keys: expected two equal zigzag pieces per rank "
            f"and {local} x cp={shard.size} keys"
        )
    plan = Plan(shard, local // 2, scale, d_nope)
    return _LatentAttention.apply(query, latent, k_rope, kv_weight, plan)
