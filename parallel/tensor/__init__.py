"""Tensor parallelism (Megatron-style): column/row-parallel linear layers, the vocabulary-parallel
embedding and cross-entropy, and the helpers that shard and gather full tensors."""

from parallel.tensor.layers import (
    SEQUENCE_DIM,
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    full_tensor,
    gather_tensor,
    mark_sharded,
    shard_size,
    shard_tensor,
    tp_dim,
    vocab_parallel_cross_entropy,
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
