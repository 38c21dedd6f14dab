"""Tensor-parallel layers: column- and row-parallel linears, vocab-parallel embedding and cross-entropy.

With a TP group of size p and a linear `Y = X W^T` (W of shape out x in):

    column parallel:  W = [W_1; ...; W_p] split by output rows   Y_i = X W_i^T        (Y = [Y_1 ... Y_p])
    row parallel:     W = [W_1  ...  W_p] split by input columns Y   = sum_i X_i W_i^T (one all-reduce)

A column-parallel layer followed by a row-parallel one (attention heads, the SwiGLU MLP) needs exactly one
all-reduce forward (after the row layer) and one backward (before the column layer).

The vocabulary is split in contiguous row ranges, padded to a multiple of p when it does not divide; the
padding rows are zero and their logits are -inf, so padding is never predicted. Cross-entropy over
vocab-sharded logits needs three all-reduces of (tokens,)-sized tensors and never builds full-vocabulary
logits on one rank.

Every sharded parameter records how it is split (`tp_dim`, `tp_full_size`), so a full tensor can be
sharded (`shard_tensor`) or rebuilt (`gather_tensor`) for any TP size: initialisation, checkpoints and
tests all work on full tensors and stay layout-independent.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallel.collectives import (
    _all_reduce,
    copy_to_group,
    gather_from_group,
    gather_from_sequence_parallel,
    group_rank,
    group_size,
    reduce_from_group,
    reduce_scatter_to_group,
    split_to_group,
)
from parallel.pipeline.deferred_wgrad import linear

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


class ColumnParallelLinear(nn.Module):
    """Y = X W^T + b with W split by output rows: each rank computes out_features / tp output features.

    `gather_output=True` concatenates the shards (replicated output); otherwise the output stays sharded
    on its last dimension. With `sequence_parallel=True` the input arrives split along the sequence and is
    all-gathered first (the backward reduce-scatters). `reduce_input_grad=False` skips the backward
    all-reduce of the input gradient, for a caller that applies `copy_to_group` itself once for several
    layers sharing the same input (gate and up projections of the MLP).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        group: dist.ProcessGroup | None = None,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        reduce_input_grad: bool = True,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group = group
        self.tp_size, self.tp_rank = group_size(group), group_rank(group)
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        self.reduce_input_grad = reduce_input_grad
        self.local_out = shard_size(out_features, self.tp_size)
        self.weight = mark_sharded(nn.Parameter(torch.empty(self.local_out, in_features)), 0, out_features)
        self.bias = mark_sharded(nn.Parameter(torch.zeros(self.local_out)), 0, out_features) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    @property
    def num_valid_local(self) -> int:
        """How many of this rank's output features are real (the rest is padding)."""
        return max(0, min(self.local_out, self.out_features - self.tp_rank * self.local_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sequence_parallel(x, SEQUENCE_DIM, self.group)
        elif self.reduce_input_grad:
            x = copy_to_group(x, self.group)
        y = linear(x, self.weight, self.bias)
        if self.gather_output:
            y = gather_from_group(y, -1, self.group).narrow(-1, 0, self.out_features)
        return y

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, local_out={self.local_out}, tp={self.tp_size}"
        )


class RowParallelLinear(nn.Module):
    """Y = X W^T + b with W split by input columns: Y = sum over ranks of X_i W_i^T (all-reduce).

    `input_is_parallel=True` expects X already split on its last dimension (the output of a
    column-parallel layer); otherwise X is split here. With `sequence_parallel=True` the sum is a
    reduce-scatter along the sequence instead of an all-reduce.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        group: dist.ProcessGroup | None = None,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group = group
        self.tp_size = group_size(group)
        if in_features % self.tp_size:
            raise ValueError(
                f"RowParallelLinear: in_features={in_features} is not divisible by tp={self.tp_size}"
            )
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        if bias and self.sequence_parallel:
            raise ValueError("RowParallelLinear: bias with sequence_parallel=True is not supported")
        self.local_in = in_features // self.tp_size
        self.weight = mark_sharded(nn.Parameter(torch.empty(out_features, self.local_in)), 1, in_features)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = split_to_group(x, -1, self.group)
        y = linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_group(y, SEQUENCE_DIM, self.group)
        else:
            y = reduce_from_group(y, self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, local_in={self.local_in}, tp={self.tp_size}"


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the vocabulary) are split in contiguous ranges over the TP group.

    Each rank looks up the ids in its range, writes zeros elsewhere, and one all-reduce sums the partial
    lookups into the full, replicated embedding. With `sequence_parallel=True` the sum is a reduce-scatter
    along the sequence instead: each rank gets the full embedding of its slice of the sequence. Ids outside
    [0, num_embeddings) are an error.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        group: dist.ProcessGroup | None = None,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.tp_size, self.tp_rank = group_size(group), group_rank(group)
        self.local_rows = shard_size(num_embeddings, self.tp_size)
        self.vocab_start = self.tp_rank * self.local_rows
        self.weight = mark_sharded(
            nn.Parameter(torch.empty(self.local_rows, embedding_dim)), 0, num_embeddings
        )
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not ids.is_cuda:  # a device-side check would force a host sync on GPUs
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.num_embeddings:
                bad = hi if hi >= self.num_embeddings else lo
                raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.num_embeddings})")
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.local_rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_group(out, SEQUENCE_DIM, self.group)
        return reduce_from_group(out, self.group)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, local_rows={self.local_rows}, tp={self.tp_size}"


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
