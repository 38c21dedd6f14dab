"""Low-bit block-wise quantization: 8-bit dynamic maps (8-bit optimizers) and 4-bit NormalFloat (QLoRA).

Block-wise absmax quantization. A tensor is flattened, zero-padded to a multiple of the block size B and
cut into blocks x_b of B values. Each block keeps its scale s_b = max |x_b| (fp32) and, per value, the
index of the code-book entry nearest to the normalised value:

    q_i = argmin_j |x_i / s_b - code_j|          (ties go to the lower code)
    x_i ~ code[q_i] * s_b

A block of zeros has s_b = 0 and decodes to zeros. Rounding compares v = x / s_b (float32) with the
decision thresholds between neighbouring codes: the exact midpoints (code_j + code_{j+1}) / 2, computed in
float64 and rounded *down* to float32, so that `v <= t_j` holds exactly when code_j is at least as near as
code_{j+1}. The result equals argmin over the code book in exact arithmetic. Inputs must be finite.

Rounding without a search: the top 16 bits of a float32 (sign, exponent, 7 mantissa bits) name a "cell" of
65,536 consecutive floats. For the dynamic maps and NF4 no cell holds more than one threshold, so a table
gives each cell the nearest code of its smallest value, j, and the threshold t_j, and
q = table_code[cell] + (v > table_threshold[cell]): two gathers from 65,536-entry tables and a compare,
about 10x faster on CPU than `torch.bucketize`'s binary search. Code books too dense for that (any code
book may be passed to `quantize_blockwise`) use `torch.bucketize`.

Two code books:

- The dynamic map of Dettmers et al. (2021, "8-bit Optimizers via Block-wise Quantization"; bitsandbytes
  `create_dynamic_map`): decade d = 0..6 covers magnitudes 10^(d-6) * [0.1, 1], cut into k_d equal
  intervals whose midpoints are the codes, k_d = 2^d (signed map, mirrored to negative values) or
  2^(d+1) (unsigned map); plus 0 and 1. Both have 256 values: the signed map (first Adam moment) runs
  from -0.99296875 to 1 with 0 at index 127; the unsigned map (second moment) from 0 (index 0) to 1.
  The smallest non-zero magnitudes are 5.5e-7 (signed) and 3.25e-7 (unsigned): seven decades of range.
- NF4 (Dettmers et al. 2023, "QLoRA"): 16 values, the quantiles of N(0, 1) normalised to [-1, 1], with an
  exact zero: 8 positive values Phi^-1 of linspace(delta, 1/2, 9)[:-1], 7 negative ones
  -Phi^-1 of linspace(delta, 1/2, 8)[:-1], delta = 0.9677083, then 0, all divided by the largest.

NF4 storage (`NF4Tensor`): block size 64 by default, two codes per byte, the *first* element of each pair
in the high nibble (byte = q_{2i} << 4 | q_{2i+1}, as bitsandbytes packs), one absmax per block. With
double quantization the absmaxes s_b are themselves quantized: their mean mu is subtracted and
s_b - mu is stored with the signed dynamic 8-bit map in blocks of 256 (one fp32 scale per 256 absmaxes),
mu kept in fp32. Bits per parameter, for a tensor of n = 64 * 256 * k values:

    without double quantization: 4 + 32/64                      = 4.5
    with:                        4 + 8/64 + 32/(64*256) + 32/n  = 4.127 + 32/n
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
"""The 16 NormalFloat-4 values of QLoRA (Appendix E of the paper), sorted."""

NF4_BLOCK_SIZE = 64
ABSMAX_BLOCK_SIZE = 256  # blocks of absmaxes in double quantization


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The dynamic quantization map of Dettmers et al. (2021), sorted, float32, 2**total_bits values.

    Decade d (d = 0 .. max_exponent_bits - 1) spans 10^(d - max_exponent_bits + 1) * [0.1, 1]; it is cut
    into 2^(d + total_bits - 1 - max_exponent_bits) equal intervals (twice as many when unsigned, since the
    sign bit is free) and each interval's midpoint is a code, mirrored to negative values when signed.
    When the fraction has bits to spare, 2^(total_bits - 1 - max_exponent_bits) - 1 extra codes fill the
    top decade the same way. Then 0 and 1 are added. Values are computed in float64 and rounded once.
    """
    non_sign_bits = total_bits - 1
    values: list[torch.Tensor] = []

    def midpoints(intervals: int, decade: int) -> torch.Tensor:
        edges = torch.linspace(0.1, 1.0, intervals + 1, dtype=torch.float64)
        return 10.0 ** (decade - max_exponent_bits + 1) * (edges[:-1] + edges[1:]) / 2

    for decade in range(max_exponent_bits):
        intervals = 2 ** (decade + non_sign_bits - max_exponent_bits + (0 if signed else 1))
        values.append(midpoints(intervals, decade))
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
    if extra > 0:
        values.append(midpoints(extra, max_exponent_bits - 1))
    positive = torch.cat(values)
    parts = [-positive, positive] if signed else [positive]
    code = torch.cat([*parts, torch.tensor([0.0, 1.0], dtype=torch.float64)]).sort().values.float()
    if code.numel() != 2**total_bits or code.unique().numel() != code.numel():
        raise ValueError(
            f"create_dynamic_map(signed={signed}, max_exponent_bits={max_exponent_bits}, "
            f"total_bits={total_bits}) gives {code.unique().numel()} distinct values, not {2**total_bits}"
        )
    return code


def rounding_thresholds(code: torch.Tensor) -> torch.Tensor:
    """Float32 decision thresholds of a sorted code book: `bucketize(v, t)` is the nearest code's index.

    t_j is the largest float32 not above the exact midpoint (code_j + code_{j+1}) / 2 (exact in float64),
    so a float32 v rounds to code_j exactly when |v - code_j| <= |v - code_{j+1}|.
    """
    if code.dim() != 1 or code.numel() < 2 or not bool((code[1:] > code[:-1]).all()):
        raise ValueError(
            f"code must be a sorted 1-D tensor of distinct values, got shape {tuple(code.shape)}"
        )
    exact = (code[:-1].double() + code[1:].double()) / 2
    below = exact.float()
    too_high = below.double() > exact
    return torch.where(too_high, torch.nextafter(below, torch.full_like(below, -math.inf)), below)


@dataclass(frozen=True)
class RoundingTables:
    """Nearest-code lookup for one code book on one device (see the module docstring)."""

    code: torch.Tensor  # float32 (n,)
    thresholds: torch.Tensor  # float32 (n - 1,), for the bucketize fallback
    cell_code: torch.Tensor | None  # uint8 (65536,): nearest code of each cell's smallest value
    cell_threshold: torch.Tensor | None  # float32 (65536,): above it the next code is nearer

    def encode(self, v: torch.Tensor) -> torch.Tensor:
        """uint8 index of the nearest code of each value of the contiguous float32 tensor `v`."""
        if self.cell_code is None:
            return torch.bucketize(v, self.thresholds, out_int32=True).to(torch.uint8)
        # the high half of each little-endian float32 word: its top 16 bits, read as an unsigned key
        cell = v.reshape(-1).view(torch.uint16)[1::2].long()
        base = self.cell_code.index_select(0, cell).view(v.shape)
        return base.add_(v > self.cell_threshold.index_select(0, cell).view(v.shape))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """float32 code values of uint8 indices, same shape."""
        return self.code.index_select(0, codes.reshape(-1).long()).view(codes.shape)


def _cell_bounds() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each 16-bit cell: its smallest and largest float32 value and whether it holds finite values."""
    keys = torch.arange(65536, dtype=torch.int64)
    first = ((keys << 16) - (keys >= 0x8000).long() * 2**32).to(torch.int32)
    last = first | 0xFFFF
    a, b = first.view(torch.float32), last.view(torch.float32)
    finite = (keys & 0x7F80) != 0x7F80  # exponent field not all ones: no inf, no NaN
    return torch.minimum(a, b), torch.maximum(a, b), finite


def rounding_tables(code: torch.Tensor, device: torch.device | str | None = None) -> RoundingTables:
    """Build the nearest-code tables of a sorted code book (cached per code book and device)."""
    code = code.detach().to("cpu", torch.float32)
    key = (tuple(code.tolist()), str(torch.device(device or "cpu")))
    if key not in _TABLES:
        _TABLES[key] = _build_tables(code, torch.device(device or "cpu"))
    return _TABLES[key]


_TABLES: dict[tuple, RoundingTables] = {}


def _build_tables(code: torch.Tensor, device: torch.device) -> RoundingTables:
    thresholds = rounding_thresholds(code)
    lowest, highest, finite = _cell_bounds()
    lowest, highest = torch.where(finite, lowest, 0.0), torch.where(finite, highest, 0.0)
    first = torch.bucketize(lowest, thresholds)
    last = torch.bucketize(highest, thresholds)
    if code.numel() > 256 or int((last - first).max()) > 1:
        cell_code = cell_threshold = None
    else:
        cell_code = first.to(torch.uint8).to(device)
        cell_threshold = torch.cat([thresholds, thresholds.new_full((1,), math.inf)])[first].to(device)
    return RoundingTables(code.to(device), thresholds.to(device), cell_code, cell_threshold)


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x flattened to float32, zero-padded to whole blocks, shape (n_blocks, block_size)."""
    flat = x.reshape(-1).float()
    pad = -flat.numel() % block_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, block_size)


def quantize_blocks(blocks: torch.Tensor, tables: RoundingTables) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked float32 data (n_blocks, B) to uint8 codes (n_blocks, B) and absmax (n_blocks,). No checks."""
    absmax = blocks.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return tables.encode(blocks / scale.unsqueeze(1)), absmax


def dequantize_blocks(codes: torch.Tensor, absmax: torch.Tensor, tables: RoundingTables) -> torch.Tensor:
    """Inverse of `quantize_blocks`: code[codes] * absmax per block, float32 (n_blocks, B)."""
    return tables.decode(codes) * absmax.unsqueeze(1)


def quantize_blockwise(
    x: torch.Tensor, code: torch.Tensor, block_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise absmax quantization of `x` (any shape, any float dtype, finite) to a 256-value code book.

    Returns (codes, absmax): `codes` uint8 of shape (n_blocks * block_size,) (x flattened, zero-padded to
    whole blocks; padding decodes to 0), `absmax` float32 of shape (n_blocks,). Rounding is to the
    nearest code (ties to the lower one), after dividing each value by its block's absmax in float32.
    """
    if block_size < 1:
        raise ValueError(f"block_size={block_size}: expected a positive integer")
    if code.numel() > 256:
        raise ValueError(f"code has {code.numel()} values; uint8 codes index at most 256")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("quantize_blockwise: x contains NaN or infinity")
    codes, absmax = quantize_blocks(_blocks(x, block_size), rounding_tables(code, x.device))
    return codes.reshape(-1), absmax


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    block_size: int = 256,
    shape: torch.Size | tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Float32 values of `quantize_blockwise`'s output: the first prod(shape) values reshaped to `shape`,
    or all n_blocks * block_size values (padding included) when `shape` is None."""
    if codes.numel() != absmax.numel() * block_size:
        raise ValueError(
            f"{codes.numel()} codes do not make {absmax.numel()} blocks of block_size={block_size}"
        )
    tables = rounding_tables(code, codes.device)
    values = dequantize_blocks(codes.reshape(-1, block_size), absmax, tables).reshape(-1)
    if shape is None:
        return values
    return values[: math.prod(shape)].reshape(shape)


@dataclass
class NF4Tensor:
    """A tensor in 4-bit NormalFloat, block-wise, optionally with double-quantized absmaxes.

    `packed` holds ceil(n_blocks * block_size / 2) bytes, first element of a pair in the high nibble.
    Without double quantization `absmax` is the fp32 per-block scale and the three `absmax_*` fields are
    None; with it `absmax` is None and the scales are `absmax_codes` (uint8, signed dynamic map, blocks of
    256, padded), `absmax_scale` (fp32, one per 256 absmaxes) and `absmax_offset` (fp32 scalar, their mean).
    `dtype` is the dtype of the quantized tensor, which `dequantize_nf4` returns by default.
    """

    packed: torch.Tensor
    absmax: torch.Tensor | None
    absmax_codes: torch.Tensor | None
    absmax_scale: torch.Tensor | None
    absmax_offset: torch.Tensor | None
    shape: torch.Size
    block_size: int
    dtype: torch.dtype

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

    def to(self, device: torch.device | str) -> NF4Tensor:
        moved = [None if t is None else t.to(device) for t in self._fields_in_order()]
        return NF4Tensor(*moved, shape=self.shape, block_size=self.block_size, dtype=self.dtype)

    def _fields_in_order(self) -> tuple[torch.Tensor | None, ...]:
        return (self.packed, self.absmax, self.absmax_codes, self.absmax_scale, self.absmax_offset)


_SIGNED_DYNAMIC = create_dynamic_map(signed=True)


def quantize_nf4(w: torch.Tensor, block_size: int = NF4_BLOCK_SIZE, double_quant: bool = True) -> NF4Tensor:
    """Quantize `w` (any shape, float, finite) to block-wise NF4; see the module docstring for the layout."""
    if block_size < 1:
        raise ValueError(f"block_size={block_size}: expected a positive integer")
    if not w.is_floating_point():
        raise ValueError(f"quantize_nf4 expects a floating-point tensor, got {w.dtype}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("quantize_nf4: the tensor contains NaN or infinity")
    q, absmax = quantize_blocks(_blocks(w.detach(), block_size), rounding_tables(NF4_CODE, w.device))
    q = q.reshape(-1)
    if q.numel() % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    packed = (q[0::2] << 4) | q[1::2]
    if not double_quant:
        return NF4Tensor(packed, absmax, None, None, None, w.shape, block_size, w.dtype)
    offset = absmax.mean() if absmax.numel() else absmax.new_zeros(())
    absmax_codes, absmax_scale = quantize_blockwise(absmax - offset, _SIGNED_DYNAMIC, ABSMAX_BLOCK_SIZE)
    return NF4Tensor(packed, None, absmax_codes, absmax_scale, offset, w.shape, block_size, w.dtype)


def nf4_absmax(q: NF4Tensor) -> torch.Tensor:
    """The per-block fp32 scales of `q` (decoded from the double quantization when there is one)."""
    if q.absmax is not None:
        return q.absmax
    centered = dequantize_blockwise(q.absmax_codes, q.absmax_scale, _SIGNED_DYNAMIC, ABSMAX_BLOCK_SIZE)
    return centered[: q.n_blocks] + q.absmax_offset


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor `q` encodes, of its original shape, in `dtype` (default: the dtype that was quantized).

    One gather and one in-place multiply: each byte indexes a 256-entry table of its two nibbles' fp32
    code values (stored as one 8-byte word, so the gather moves whole pairs and the result is already
    unpacked, in order), then each block is scaled by its absmax in fp32 and cast once (no copy for fp32).
    """
    absmax = nf4_absmax(q)
    pairs = _nf4_byte_pairs(q.device).index_select(0, q.packed.reshape(-1).int())
    padded = q.n_blocks * q.block_size
    values = pairs.view(torch.float32)[:padded].view(q.n_blocks, q.block_size).mul_(absmax.unsqueeze(1))
    return values.view(-1)[: q.numel].view(q.shape).to(dtype or q.dtype)


_NF4_PAIRS: dict[torch.device, torch.Tensor] = {}


def _nf4_byte_pairs(device: torch.device) -> torch.Tensor:
    """(256,) words of 8 bytes: for byte b, the fp32 values of NF4 codes b >> 4 then b & 15, in memory
    order (so that viewing a gather of them as fp32 gives the unpacked values in order)."""
    if device not in _NF4_PAIRS:
        byte = torch.arange(256)
        pairs = torch.stack([NF4_CODE[byte >> 4], NF4_CODE[byte & 0x0F]], dim=1).contiguous()
        _NF4_PAIRS[device] = pairs.view(torch.float64).reshape(256).to(device)
    return _NF4_PAIRS[device]
