"""Tensor parallelism (Megatron-style): column/row-parallel linear layers (`linear`), the
vocabulary-parallel embedding (`embedding`) and cross-entropy (`cross_entropy`), and the helpers that
shard and gather full tensors (`sharding`)."""

from parallel.tensor.cross_entropy import vocab_parallel_cross_entropy
from parallel.tensor.embedding import VocabParallelEmbedding
from parallel.tensor.linear import ColumnParallelLinear, RowParallelLinear
from parallel.tensor.sharding import (
    SEQUENCE_DIM,
    full_tensor,
    gather_tensor,
    mark_sharded,
    shard_size,
    shard_tensor,
    tp_dim,
)

__all__ = [
    "SEQUENCE_DIM",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "full_tensor",
    "gather_tensor",
    "mark_sharded",
    "shard_size",
    "shard_tensor",
    "tp_dim",
    "vocab_parallel_cross_entropy",
]
