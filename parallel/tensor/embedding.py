"""The vocabulary-parallel embedding: the rows of the embedding table split over the TP group.

With p ranks and a vocabulary of V ids, rank r holds rows [r * V_local, (r + 1) * V_local),
V_local = ceil(V / p); the padding rows past V are never looked up. For ids t,

    E[t] = sum_r E_r[t]     where E_r[t] = row t - r V_local of rank r's table if t is in its range, else 0

so each rank looks up the ids in its range, writes zeros elsewhere, and one all-reduce (forward; the
backward is the identity) gives every rank the full, replicated embedding. Under sequence parallelism
the sum is a reduce-scatter along the sequence: each rank gets the full embedding of its slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallel.collectives import group_rank, group_size, reduce_from_group, reduce_scatter_to_group
from parallel.tensor.sharding import SEQUENCE_DIM, mark_sharded, shard_size


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
