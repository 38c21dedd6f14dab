"""The SwiGLU MLP of a dense decoder layer, of a shared expert and of each routed expert.

MLP(x) = (silu(x W_gate^T) * (x W_up^T)) W_down^T     gate/up column-parallel, down row-parallel
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import MLAConfig
from parallel.collectives import copy_to_group, gather_from_sequence_parallel
from parallel.tensor import SEQUENCE_DIM, ColumnParallelLinear, RowParallelLinear


class MLP(nn.Module):
    """SwiGLU MLP; the gate and up projections share one backward all-reduce of their input gradient.

    `intermediate_size` defaults to the config's (dense layers); experts pass their own width."""

    def __init__(self, config: MLAConfig, group=None, intermediate_size: int | None = None) -> None:
        super().__init__()
        h = config.hidden_size
        inter = config.intermediate_size if intermediate_size is None else intermediate_size
        self.group = group
        self.gate_proj = ColumnParallelLinear(h, inter, group=group, reduce_input_grad=False)
        self.up_proj = ColumnParallelLinear(h, inter, group=group, reduce_input_grad=False)
        self.down_proj = RowParallelLinear(inter, h, group=group)
        if self.gate_proj.local_out * self.gate_proj.tp_size != inter:
            key = "intermediate_size" if intermediate_size is None else "moe_intermediate_size (x n_shared)"
            raise ValueError(f"model.{key}: {inter} is not divisible by tp={self.gate_proj.tp_size}")
        self.sequence_parallel = False  # input split along the sequence (down_proj then reduce-scatters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sequence_parallel(x, SEQUENCE_DIM, self.group)
        else:
            x = copy_to_group(x, self.group)
        return self.compute(x)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP of an input already behind `copy_to_group` (its input gradient is reduced there)."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
