"""Column- and row-parallel linear layers (Megatron-LM), each a local matmul between two communications.

With a TP group of size p and a linear Y = X W^T (W of shape out x in):

    column parallel:  W = [W_1; ...; W_p] split by output rows    Y_i = X W_i^T        (Y = [Y_1 ... Y_p])
    row parallel:     W = [W_1  ...  W_p] split by input columns  Y   = sum_i X_i W_i^T

Each layer computes `combine_output(local matmul(local_input(x)))`, with one communication mode each:

    column:  local_input    copy_to_group (identity; all-reduce of dX backward, as every rank's dX_i is
                            a partial sum), or under sequence parallelism the all-gather of the sequence
                            (reduce-scatter backward)
             combine_output the shards as they are, or all-gathered on the last dimension (`gather_output`)
    row:     local_input    X as it is (already split by a column layer), or this rank's slice of it
             combine_output all-reduce of the partial products, or under sequence parallelism their
                            reduce-scatter along the sequence

A column-parallel layer followed by a row-parallel one (attention heads, the SwiGLU MLP) needs exactly one
all-reduce forward (after the row layer) and one backward (before the column layer). Wrappers that add a
term to the local product (LoRA) reuse `local_input` and `combine_output` so that they communicate
exactly as the layer they wrap.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from parallel.collectives import (
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
from parallel.tensor.sharding import SEQUENCE_DIM, mark_sharded, shard_size


class _ParallelLinear(nn.Module):
    """What both layouts share: sizes, the group, and a weight drawn from N(0, 0.02^2)."""

    def __init__(
        self, in_features: int, out_features: int, group: dist.ProcessGroup | None, sequence_parallel: bool
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group = group
        self.tp_size, self.tp_rank = group_size(group), group_rank(group)
        self.sequence_parallel = sequence_parallel and self.tp_size > 1

    def _create_parameters(self, weight_shape: tuple[int, int], dim: int, bias: nn.Parameter | None) -> None:
        full_size = (self.out_features, self.in_features)[dim]
        self.weight = mark_sharded(nn.Parameter(torch.empty(weight_shape)), dim, full_size)
        self.bias = bias
        nn.init.normal_(self.weight, std=0.02)


class ColumnParallelLinear(_ParallelLinear):
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
        super().__init__(in_features, out_features, group, sequence_parallel)
        self.gather_output = gather_output
        self.reduce_input_grad = reduce_input_grad
        self.local_out = shard_size(out_features, self.tp_size)
        local_bias = (
            mark_sharded(nn.Parameter(torch.zeros(self.local_out)), 0, out_features) if bias else None
        )
        self._create_parameters((self.local_out, in_features), 0, local_bias)

    @property
    def num_valid_local(self) -> int:
        """How many of this rank's output features are real (the rest is padding)."""
        return max(0, min(self.local_out, self.out_features - self.tp_rank * self.local_out))

    def local_input(self, x: torch.Tensor) -> torch.Tensor:
        """The full input every rank multiplies by its shard (all-gathered under sequence parallelism)."""
        if self.sequence_parallel:
            return gather_from_sequence_parallel(x, SEQUENCE_DIM, self.group)
        if self.reduce_input_grad:
            return copy_to_group(x, self.group)
        return x

    def combine_output(self, y: torch.Tensor) -> torch.Tensor:
        """This rank's output features, or all of them (padding dropped) with `gather_output`."""
        if self.gather_output:
            return gather_from_group(y, -1, self.group).narrow(-1, 0, self.out_features)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine_output(linear(self.local_input(x), self.weight, self.bias))

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, local_out={self.local_out}, tp={self.tp_size}"
        )


class RowParallelLinear(_ParallelLinear):
    """Y = X W^T + b with W split by input columns: Y = sum over ranks of X_i W_i^T (all-reduce).

    `input_is_parallel=True` expects X already split on its last dimension (the output of a
    column-parallel layer); otherwise X is split here. With `sequence_parallel=True` the sum is a
    reduce-scatter along the sequence instead of an all-reduce. The bias is added once, after the sum.
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
        super().__init__(in_features, out_features, group, sequence_parallel)
        if in_features % self.tp_size:
            raise ValueError(
                f"RowParallelLinear: in_features={in_features} is not divisible by tp={self.tp_size}"
            )
        if bias and self.sequence_parallel:
            raise ValueError("RowParallelLinear: bias with sequence_parallel=True is not supported")
        self.input_is_parallel = input_is_parallel
        self.local_in = in_features // self.tp_size
        full_bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._create_parameters((out_features, self.local_in), 1, full_bias)

    def local_input(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the input features."""
        return x if self.input_is_parallel else split_to_group(x, -1, self.group)

    def combine_output(self, y: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's partial product (split along the sequence under sequence parallelism)."""
        if self.sequence_parallel:
            return reduce_scatter_to_group(y, SEQUENCE_DIM, self.group)
        return reduce_from_group(y, self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.combine_output(linear(self.local_input(x), self.weight))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, local_in={self.local_in}, tp={self.tp_size}"
