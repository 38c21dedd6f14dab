"""Parallelism written directly on torch.distributed: topology, collectives, tensor / pipeline / data
parallelism, ZeRO, 8-bit AdamW, quantization and LoRA (`parallel.quant`, `parallel.lora`)."""

from parallel.adam8bit import AdamW8bit
from parallel.collectives import (
    copy_to_group,
    gather_from_group,
    gather_from_sequence_parallel,
    reduce_from_group,
    reduce_scatter_to_group,
    split_to_group,
)
from parallel.data_parallel import DataParallel
from parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    full_tensor,
    gather_tensor,
    shard_tensor,
    vocab_parallel_cross_entropy,
)
from parallel.topology import ParallelDims, Topology, destroy_distributed, init_distributed
from parallel.zero import ZeroOptimizer

__all__ = [
    "AdamW8bit",
    "ColumnParallelLinear",
    "DataParallel",
    "ParallelDims",
    "RowParallelLinear",
    "Topology",
    "VocabParallelEmbedding",
    "ZeroOptimizer",
    "copy_to_group",
    "destroy_distributed",
    "full_tensor",
    "gather_from_group",
    "gather_from_sequence_parallel",
    "gather_tensor",
    "init_distributed",
    "reduce_from_group",
    "reduce_scatter_to_group",
    "shard_tensor",
    "split_to_group",
    "vocab_parallel_cross_entropy",
]
