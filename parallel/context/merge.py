"""Exact softmax attention over key chunks: partial results and their log-sum-exp merge.

For one query and keys split in chunks j, with scores s_jk and values v_jk, chunk j alone gives

    lse_j = log sum_k exp(s_jk)          o_j = sum_k exp(s_jk - lse_j) v_jk

and the attention over all keys is the weighted mean of the partial outputs:

    lse = log sum_j exp(lse_j)           o = sum_j exp(lse_j - lse) o_j

(merging is associative, so chunks can be folded in one at a time, in any order). A query that sees no
key of a chunk (causal or document mask) has lse_j = -inf and o_j = 0: its weight exp(-inf - lse) is 0.

Backward (flash-attention's identity): with p_jk = exp(s_jk - lse) the final probabilities and dO the
output gradient, D = dO . o (one number per query), and for every chunk separately

    dv_jk = p_jk dO          ds_jk = p_jk (dO . v_jk - D)

so a chunk's gradients need only the saved (o, lse), never the other chunks.
"""

from __future__ import annotations

import torch


def partial_attention(
    scores: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_j, lse_j) of fp32 `scores` (..., q, k) over `values` (..., k, d); `allowed` (broadcastable to
    the scores, True where a query may attend) masks the rest. o_j and lse_j have the scores' dtype."""
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - _finite(lse).unsqueeze(-1))
    return torch.matmul(probs.to(values.dtype), values).to(scores.dtype), lse


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention over the keys of both chunks, from each chunk's (o, lse) (o: (..., q, d))."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = _finite(lse)
    weight_a = torch.exp(lse_a - safe).unsqueeze(-1)
    weight_b = torch.exp(lse_b - safe).unsqueeze(-1)
    return out_a * weight_a + out_b * weight_b, lse


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """-inf (a query that sees nothing) replaced by 0, so that exp(-inf - lse) stays 0, not NaN."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
