"""Cross-entropy of logits split on the vocabulary dimension, without ever building full logits.

For one token with logits z over the vocabulary and target t, with m = max_v z_v:

    loss = log sum_v exp(z_v - m) - (z_t - m),      d loss / d z_v = softmax(z)_v - [v == t]

Rank r holds the vocabulary slice [r * V_local, (r + 1) * V_local). The max, the sum of exponentials and
the target logit (zero on every rank but the owner of t) are computed on the local slice and combined
with three all-reduces (max, sum, sum) of (tokens,)-sized tensors. Padding rows of a vocabulary that does
not divide by p hold -inf logits (their weights are zero and the model masks them), so they add nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.collectives import _all_reduce, group_rank, group_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token -log softmax(z)[target] for logits split on the vocabulary dimension.

    loss_t = log sum_v exp(z_tv - m_t) - (z_t,target - m_t), m_t = max_v z_tv. Each rank holds a vocab
    slice [start, start + V_local): the max, the sum of exponentials and the target logit are computed
    locally and combined with all-reduces (max, sum, sum). d loss_t / d z_tv = softmax_tv - [v == target].
    """

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, ignore_index, group):
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        local_max = logits.max(dim=-1).values
        if group_size(group) > 1:
            dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - local_max.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = _all_reduce(exp.sum(dim=-1), group)

        ignored = targets == ignore_index
        local_t = targets - vocab_start
        mine = (local_t >= 0) & (local_t < logits.shape[-1]) & ~ignored
        index = local_t.masked_fill(~mine, 0).unsqueeze(-1)
        target_logit = shifted.gather(-1, index).squeeze(-1).masked_fill(~mine, 0.0)
        target_logit = _all_reduce(target_logit, group)

        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, index, mine, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, index, mine, ignored = ctx.saved_tensors
        grad = softmax
        grad.scatter_add_(-1, index, -mine.unsqueeze(-1).to(grad.dtype))
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    targets: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of vocab-sharded logits (..., V/tp) against full targets (...), in fp32 or wider.

    Rank r holds vocabulary ids [r * V_local, (r + 1) * V_local). Targets equal to `ignore_index` add
    nothing. `reduction`: "mean" over non-ignored tokens (0 when all are ignored), "sum", or "none"
    (per-token losses, 0 at ignored positions). Never materialises full-vocabulary logits on one rank.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r}: expected 'mean', 'sum' or 'none'")
    if local_logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits shape {tuple(local_logits.shape)} does not match targets shape {tuple(targets.shape)}"
        )
    vocab_start = group_rank(group) * local_logits.shape[-1]
    flat_logits = local_logits.reshape(-1, local_logits.shape[-1])
    flat_targets = targets.reshape(-1)
    loss = _VocabParallelCrossEntropy.apply(flat_logits, flat_targets, vocab_start, ignore_index, group)
    if reduction == "none":
        return loss.view(targets.shape)
    total = loss.sum()
    if reduction == "sum":
        return total
    count = (flat_targets != ignore_index).sum().clamp(min=1)
    return total / count
