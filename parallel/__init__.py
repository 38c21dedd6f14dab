"""Parallelism written directly on torch.distributed.

One folder per concept:

- `topology`, `collectives`, `grad_clip`: the rank grid and its process groups, autograd-aware
  collectives, global-norm clipping across tensor/pipeline shards;
- `tensor/`: column/row-parallel linear, vocabulary-parallel embedding and cross-entropy;
- `data/`: gradient buckets, `DataParallel`, the ZeRO optimizer (stages 0-3, offload);
- `pipeline/`: schedules as data, their simulator, one executor, deferred weight gradients;
- `lowbit/`: 8-bit and NF4 codes (`quant`), `AdamW8bit`, NF4 + LoRA (`lora`), fp16 loss scaling;
- `checkpoint/`: the sharded checkpoint format and re-sharding across layouts.

The public names are re-exported here; `quant`, `lora` and `checkpoint` are importable both as
`from parallel import quant` and as `parallel.quant` (the names the public contract uses).
"""

import sys

from parallel import checkpoint
from parallel.collectives import (
    copy_to_group,
    gather_from_group,
    gather_from_sequence_parallel,
    reduce_from_group,
    reduce_scatter_to_group,
    split_to_group,
)
from parallel.data import DataParallel, ZeroOptimizer
from parallel.lowbit import lora, quant
from parallel.lowbit.adamw8bit import AdamW8bit
from parallel.pipeline import ModelParts
from parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    full_tensor,
    gather_tensor,
    shard_tensor,
    vocab_parallel_cross_entropy,
)
from parallel.topology import ParallelDims, Topology, destroy_distributed, init_distributed

# `import parallel.quant` / `import parallel.lora` keep working: the modules live in parallel/lowbit/.
sys.modules.setdefault("parallel.quant", quant)
sys.modules.setdefault("parallel.lora", lora)

__all__ = [
    "AdamW8bit",
    "ColumnParallelLinear",
    "DataParallel",
    "ModelParts",
    "ParallelDims",
    "RowParallelLinear",
    "Topology",
    "VocabParallelEmbedding",
    "ZeroOptimizer",
    "checkpoint",
    "copy_to_group",
    "destroy_distributed",
    "full_tensor",
    "gather_from_group",
    "gather_from_sequence_parallel",
    "gather_tensor",
    "init_distributed",
    "lora",
    "quant",
    "reduce_from_group",
    "reduce_scatter_to_group",
    "shard_tensor",
    "split_to_group",
    "vocab_parallel_cross_entropy",
]
