"""4-bit NormalFloat tensors (QLoRA), whose quantized form does not depend on how they are sharded.

The full tensor W (n values) is flattened and cut into blocks of B = 64 values; block b keeps its
absmax s_b and one 4-bit code per value (see `parallel.lowbit.quant` for the rounding). With double
quantization the absmaxes are centred on their mean and stored with the signed 8-bit dynamic map in
groups of 256 consecutive blocks, one fp32 scale per group:

    mu = mean_b s_b,    c_g = max_{b in g} |s_b - mu|,    code8_b = nearest((s_b - mu) / c_g)

Blocks, groups and mu are all defined on the *full* tensor. A tensor-parallel rank quantizes only its
shard of W, yet holds exactly its slice of the full tensor's codes (bit-identical), the absmaxes (or
8-bit absmax codes) of its blocks, and the scales c_g of the groups its blocks fall in. Each local block
j knows its place in the full tensor through an `NF4BlockLayout`:

    full(j) = (j // per_row) * row_stride + first + j % per_row

A row shard (dim 0, contiguous rows) is one run of blocks starting at `first`; a column shard (the last
dim) is, per row, `per_row` blocks starting at column block `first` of rows of `row_stride` blocks. The
shard's boundaries must fall on block boundaries (`nf4_shard_layout` says which numbers do not).

The two global statistics are agreed with small collectives over the tensor-parallel group: mu is the
sum of the s_b in 2^-k fixed point (integers add exactly, in any order, so every layout gets the same
bits) divided by the number of blocks, and c_g is an all-reduce MAX over the vector of group maxima
(numel / 16384 values). Quantizing therefore never materialises the full weight on a rank.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.lowbit import native
from parallel.lowbit.quant import (
    ABSMAX_BLOCK_SIZE,
    NF4_BLOCK_SIZE,
    NF4_CODE,
    _blocks,
    create_dynamic_map,
    quantize_blocks,
    rounding_tables,
)

_SIGNED_DYNAMIC = create_dynamic_map(signed=True)


@dataclass(frozen=True)
class NF4BlockLayout:
    """Where this shard's blocks sit among the full tensor's `full_blocks` blocks (module docstring)."""

    per_row: int
    row_stride: int
    first: int
    full_blocks: int

    def full_index(self, n_blocks: int, device: torch.device | str) -> torch.Tensor:
        j = torch.arange(n_blocks, device=device)
        return (j // self.per_row) * self.row_stride + self.first + j % self.per_row


def nf4_shard_layout(
    full_shape: tuple[int, ...], dim: int, rank: int, world: int, block_size: int = NF4_BLOCK_SIZE
) -> NF4BlockLayout:
    """The block layout of shard `rank` of `world` equal shards of a `full_shape` tensor along `dim`
    (0 or the last dim). Shards that do not cut the full tensor on block boundaries are an error naming
    the numbers."""
    shape, ndim = tuple(full_shape), len(full_shape)
    dim = dim % ndim
    where = f"NF4 weight of shape {shape} split over {world} ranks along dim {dim}"
    if shape[dim] % world:
        raise ValueError(f"{where}: {shape[dim]} is not divisible by {world}")
    per = shape[dim] // world
    if dim == 0:
        local = per * math.prod(shape[1:])
        if local % block_size:
            raise ValueError(
                f"{where}: each shard holds {per} x {math.prod(shape[1:])} = {local} values, not a whole "
                f"number of blocks of {block_size}; the shards would not hold whole blocks of the full tensor"
            )
        n = local // block_size
        return NF4BlockLayout(n, n, rank * n, world * n)
    if dim != ndim - 1:
        raise ValueError(f"{where}: only the first or the last dim can be split")
    if per % block_size:
        raise ValueError(
            f"{where}: each shard holds {per} columns of {shape[dim]}, not a multiple of the block size "
            f"{block_size}; the shards would not hold whole blocks of the full tensor"
        )
    per_row, row_stride = per // block_size, shape[dim] // block_size
    return NF4BlockLayout(per_row, row_stride, rank * per_row, math.prod(shape) // block_size)


@dataclass
class NF4Tensor:
    """A tensor (or a shard of one) in 4-bit NormalFloat, block-wise, optionally double-quantized.

    `packed` holds ceil(n_blocks * block_size / 2) bytes, first element of a pair in the high nibble.
    Without double quantization `absmax` is the fp32 per-block scale and the three `absmax_*` fields are
    None; with it `absmax` is None and the scales are `absmax_codes` (uint8, signed dynamic map, one per
    block), `absmax_scale` (fp32, one per group of 256 blocks that this tensor's blocks fall in) and
    `absmax_offset` (fp32 scalar, the full tensor's mean absmax). `dtype` is the dtype of the quantized
    tensor, which `dequantize_nf4` returns by default. `layout` places a shard's blocks in the full
    tensor (None: this is the full tensor).
    """

    packed: torch.Tensor
    absmax: torch.Tensor | None
    absmax_codes: torch.Tensor | None
    absmax_scale: torch.Tensor | None
    absmax_offset: torch.Tensor | None
    shape: torch.Size
    block_size: int
    dtype: torch.dtype
    layout: NF4BlockLayout | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.block_size)

    @property
    def double_quant(self) -> bool:
        return self.absmax is None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in self._fields_in_order() if t is not None]

    def storage_bits(self) -> int:
        """Exact number of bits held in tensors (codes, scales, offset), padding included."""
        return sum(8 * t.numel() * t.element_size() for t in self.tensors())

    def bits_per_parameter(self) -> float:
        return self.storage_bits() / self.numel

    def codes(self) -> torch.Tensor:
        """The unpacked 4-bit code of every value (uint8, this tensor's shape)."""
        unpacked = torch.stack([self.packed >> 4, self.packed & 0x0F], dim=-1).reshape(-1)
        return unpacked[: self.numel].reshape(self.shape)

    def group_index(self) -> torch.Tensor:
        """For each block, the index of its group's scale in `absmax_scale`."""
        if self.layout is None:
            return torch.arange(self.n_blocks, device=self.device) // ABSMAX_BLOCK_SIZE
        return _shard_group_index(self.layout, self.n_blocks, str(self.device))

    def to(self, device: torch.device | str) -> NF4Tensor:
        moved = [None if t is None else t.to(device) for t in self._fields_in_order()]
        return NF4Tensor(
            *moved, shape=self.shape, block_size=self.block_size, dtype=self.dtype, layout=self.layout
        )

    def _fields_in_order(self) -> tuple[torch.Tensor | None, ...]:
        return (self.packed, self.absmax, self.absmax_codes, self.absmax_scale, self.absmax_offset)


def _shard_group_index(layout: NF4BlockLayout, n_blocks: int, device: str) -> torch.Tensor:
    """Per block of a shard, the index of its group among the groups the shard touches. Recomputed at
    each decode (work on n_blocks = numel / 64 values, small next to the decode itself) rather than cached:
    a cache would hold 8 bytes per block of every shard shape, memory the estimator does not count."""
    groups = layout.full_index(n_blocks, device) // ABSMAX_BLOCK_SIZE
    return torch.unique(groups, return_inverse=True)[1]


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _exact_mean(values: torch.Tensor, count: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """mean of non-negative `values` over every rank of `group` (`count` in all), the same bits whatever
    the split: each value is rounded to 2^-k fixed point (k from the global maximum, so the int64 sum
    cannot overflow) and the integers are summed."""
    top = _all_reduce(
        values.max().reshape(1) if values.numel() else values.new_zeros(1), dist.ReduceOp.MAX, group
    )
    if count == 0 or float(top) == 0.0:
        return values.new_zeros(())
    k = 61 - math.ceil(math.log2(count + 1)) - math.frexp(float(top))[1]
    fixed = torch.round(values.double() * 2.0**k).long().sum().reshape(1)
    total = int(_all_reduce(fixed, dist.ReduceOp.SUM, group))
    return torch.tensor(total * 2.0**-k / count, dtype=torch.float32, device=values.device)


def quantize_nf4(
    w: torch.Tensor,
    block_size: int = NF4_BLOCK_SIZE,
    double_quant: bool = True,
    layout: NF4BlockLayout | None = None,
    group: dist.ProcessGroup | None = None,
) -> NF4Tensor:
    """Quantize `w` (any shape, float, finite) to block-wise NF4; see the module docstrings for the layout.

    With `layout` (from `nf4_shard_layout`), `w` is this rank's shard of a tensor split over `group`:
    collective over `group`, and the result is this shard's slice of the full tensor's quantized form.
    """
    if block_size < 1:
        raise ValueError(f"block_size={block_size}: expected a positive integer")
    if not w.is_floating_point():
        raise ValueError(f"quantize_nf4 expects a floating-point tensor, got {w.dtype}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("quantize_nf4: the tensor contains NaN or infinity")
    if layout is not None and w.numel() % block_size:
        raise ValueError(f"quantize_nf4: a shard of {w.numel()} values is not whole blocks of {block_size}")
    q, absmax = quantize_blocks(_blocks(w.detach(), block_size), rounding_tables(NF4_CODE, w.device))
    q = q.reshape(-1)
    if q.numel() % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    packed = (q[0::2] << 4) | q[1::2]
    result = NF4Tensor(packed, absmax, None, None, None, w.shape, block_size, w.dtype, layout)
    if not double_quant:
        return result
    full_blocks = absmax.numel() if layout is None else layout.full_blocks
    offset = _exact_mean(absmax, full_blocks, group)
    full = (
        torch.arange(absmax.numel(), device=w.device)
        if layout is None
        else layout.full_index(absmax.numel(), w.device)
    )
    groups = full // ABSMAX_BLOCK_SIZE
    centered = absmax - offset
    group_max = torch.zeros(-(-full_blocks // ABSMAX_BLOCK_SIZE), device=w.device)
    group_max.scatter_reduce_(0, groups, centered.abs(), "amax")
    group_max = _all_reduce(group_max, dist.ReduceOp.MAX, group)
    scale = torch.where(group_max > 0, group_max, torch.ones_like(group_max))[groups]
    tables = rounding_tables(_SIGNED_DYNAMIC, w.device)
    result.absmax, result.absmax_offset = None, offset
    result.absmax_codes = tables.encode((centered / scale).contiguous())
    result.absmax_scale = group_max if layout is None else group_max[torch.unique(groups)]
    return result


def nf4_absmax(q: NF4Tensor) -> torch.Tensor:
    """The per-block fp32 scales of `q` (decoded from the double quantization when there is one)."""
    if q.absmax is not None:
        return q.absmax
    scale = q.absmax_scale[q.group_index()]
    return rounding_tables(_SIGNED_DYNAMIC, q.device).decode(q.absmax_codes) * scale + q.absmax_offset


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor `q` encodes, of its original shape, in `dtype` (default: the dtype that was quantized).

    On the CPU, to fp32, bf16 or fp16: one native pass (parallel.lowbit.native) that writes each value
    code[nibble] * absmax, computed in fp32, straight in the output dtype (round to nearest even, as
    torch casts), decoding the double-quantized absmax of each block on the way. Elsewhere (and when
    the native kernels are unavailable) the same values with torch: one gather, in which each byte
    indexes a 256-entry table of its two nibbles' fp32 code values (stored as one 8-byte word, so the
    gather moves whole pairs and the result is already unpacked, in order), then each block is scaled by
    its absmax in fp32 and cast once (no copy for fp32). Both give the same bits.
    """
    out = _dequantize_native(q, dtype or q.dtype)
    if out is not None:
        return out
    absmax = nf4_absmax(q)
    pairs = _nf4_byte_pairs(q.device).index_select(0, q.packed.reshape(-1).int())
    padded = q.n_blocks * q.block_size
    values = pairs.view(torch.float32)[:padded].view(q.n_blocks, q.block_size).mul_(absmax.unsqueeze(1))
    return values.view(-1)[: q.numel].view(q.shape).to(dtype or q.dtype)


_NATIVE_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
NATIVE_GRAIN = 1024  # blocks per work unit of the native kernel (64 Ki values at blocks of 64)


def _dequantize_native(q: NF4Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """`dequantize_nf4` in the native kernel, or None where it does not apply (see `dequantize_nf4`)."""
    if q.device.type != "cpu" or dtype not in _NATIVE_KINDS:
        return None
    expected = {id(q.packed): torch.uint8, id(q.absmax_codes): torch.uint8}
    for t in q.tensors():
        if t.dtype != expected.get(id(t), torch.float32) or not t.is_contiguous():
            return None
    lib = native.library()
    if lib is None:
        return None
    out = torch.empty(q.shape, dtype=dtype)
    group = q.group_index() if q.double_quant and q.layout is not None else None
    code = _SIGNED_DYNAMIC if q.double_quant else None
    args = native.NF4Args(
        *map(native.pointer, (q.packed, q.absmax, q.absmax_codes, code, q.absmax_scale, group)),
        float(q.absmax_offset) if q.double_quant else 0.0,
        _NATIVE_KINDS[dtype],
        NF4_CODE.data_ptr(),
        out.data_ptr(),
        q.numel,
        q.block_size,
        q.n_blocks,
    )
    native.run_blocks(lib.nf4_dequantize, [ctypes.byref(args)], q.n_blocks, NATIVE_GRAIN)
    return out


_NF4_PAIRS: dict[torch.device, torch.Tensor] = {}


def _nf4_byte_pairs(device: torch.device) -> torch.Tensor:
    """(256,) words of 8 bytes: for byte b, the fp32 values of NF4 codes b >> 4 then b & 15, in memory
    order (so that viewing a gather of them as fp32 gives the unpacked values in order)."""
    if device not in _NF4_PAIRS:
        byte = torch.arange(256)
        pairs = torch.stack([NF4_CODE[byte >> 4], NF4_CODE[byte & 0x0F]], dim=1).contiguous()
        _NF4_PAIRS[device] = pairs.view(torch.float64).reshape(256).to(device)
    return _NF4_PAIRS[device]
