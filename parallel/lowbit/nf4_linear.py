"""A frozen linear layer whose weight is stored in 4-bit NormalFloat (QLoRA's NF4).

    y = x W^T (+ b),    W = dequantize_nf4(codes, block scales)   decoded on use, never kept

W is quantized once, block-wise (see `parallel.lowbit.quant`), and only the packed codes and the
(optionally double-quantized) block scales are stored. Forward decodes W in the compute dtype of the
input (autocast's when it is on); backward decodes it again for the input gradient dx = dy W. W never
has a gradient, so the autograd graph holds no full-precision copy of it: 4.127 bits per parameter with
double quantization instead of 16 or 32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parallel.collectives import group_rank, group_size
from parallel.lowbit.quant import NF4BlockLayout, NF4Tensor, dequantize_nf4, nf4_shard_layout, quantize_nf4

NF4_FIELDS = ("packed", "absmax", "absmax_codes", "absmax_scale", "absmax_offset")


def compute_dtype(x: torch.Tensor, *others: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x runs in: autocast's when it is on, else the promoted dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    dtype = x.dtype
    for t in others:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def nf4_layout_of_shard(
    local_shape: torch.Size, dim: int | None, full_size: int | None, group, name: str = "weight"
) -> NF4BlockLayout | None:
    """Where this rank's shard (split along `dim` over `group`, `full_size` in all) sits in the full
    weight, for `NF4Linear`; None when the weight is not split. Uneven or off-block splits are errors."""
    tp = group_size(group)
    if tp == 1 or dim is None:
        return None
    if local_shape[dim] * tp != full_size:
        raise ValueError(
            f"{name}: an NF4 base of {full_size} along dim {dim} is not split evenly over {tp} ranks"
        )
    full = list(local_shape)
    full[dim] = full_size
    try:
        return nf4_shard_layout(tuple(full), dim, group_rank(group), tp)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


class _NF4Matmul(torch.autograd.Function):
    """x W^T, W decoded from NF4 in forward and again in backward (nothing saved but the codes)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer, ctx.input_dtype, ctx.dtype = layer, x.dtype, compute_dtype(x)
        return F.linear(x.to(ctx.dtype), layer.dequantize(ctx.dtype))

    @staticmethod
    def backward(ctx, grad):
        weight = ctx.layer.dequantize(ctx.dtype)
        return (grad.to(ctx.dtype) @ weight).to(ctx.input_dtype), None


class NF4Linear(nn.Module):
    """y = x W^T (+ b) with W frozen in 4-bit NormalFloat (block-wise absmax, optionally double-quantized).

    Built from a float weight, which it quantizes and does not keep. Forward decodes W in the input's
    compute dtype (autocast's when on), backward decodes it again for the input gradient: W never has a
    gradient, and the autograd graph holds no full-precision copy of it. The codes and scales are buffers
    (they move with `.to()` and are in the state dict). `bias`, if any, is kept as given, frozen.

    Under tensor parallelism `weight` is this rank's shard, `layout` (`nf4_shard_layout`) places it in
    the full weight and `group` is the tensor-parallel group: the codes and scales are then this shard's
    slice of the full weight's (construction is collective over `group`).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: nn.Parameter | None = None,
        block_size: int = 64,
        double_quant: bool = True,
        layout: NF4BlockLayout | None = None,
        group=None,
    ) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"NF4Linear: weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        q = quantize_nf4(weight.detach(), block_size, double_quant, layout, group)
        self.block_layout = layout
        self.block_size, self.double_quant, self.weight_dtype = q.block_size, q.double_quant, q.dtype
        for field in NF4_FIELDS:
            self.register_buffer(field, getattr(q, field))
        if bias is not None:
            bias.requires_grad_(False)
        self.bias = bias

    def _apply(self, fn, recurse=True):
        """Casting the module (`.to(torch.bfloat16)`, `.half()`) leaves the codes and scales as they are:
        only their device follows. The weight is decoded in whatever dtype each use needs."""
        kept = {name: self._buffers.pop(name) for name in NF4_FIELDS}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in kept.items():
                self._buffers[name] = None if t is None else t.to(fn(t.new_empty(0)).device)
        return self

    @property
    def quantized(self) -> NF4Tensor:
        return NF4Tensor(
            *(getattr(self, field) for field in NF4_FIELDS),
            shape=torch.Size((self.out_features, self.in_features)),
            block_size=self.block_size,
            dtype=self.weight_dtype,
            layout=self.block_layout,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self.quantized, dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T without the bias."""
        return _NF4Matmul.apply(x, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, block_size={self.block_size}, "
            f"double_quant={self.double_quant}, {self.quantized.bits_per_parameter():.3f} bits/param"
        )
