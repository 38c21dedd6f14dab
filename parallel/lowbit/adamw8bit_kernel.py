"""The per-chunk arithmetic of AdamW8bit: one step on a flat run of whole blocks, decoded and re-encoded.

For a chunk of n blocks of B values, with m8, v8 the 8-bit codes and a1, a2 the fp32 block absmaxes:

    m, v   = code_signed[m8] * a1, code_unsigned[v8] * a2          (per block)
    m      = beta1 m + (1 - beta1) g,      v = beta2 v + (1 - beta2) g^2
    u      = m / (sqrt(v) / sqrt(1 - beta2^t) + eps)               returned; the caller applies p -= lr_t u
    a1, a2 = max |m|, max |v| per block;   m8, v8 = nearest code of m / a1, v / a2

m and v travel stacked, shape (2, n, B), so each operation decodes or encodes both (about 20 whole-tensor
operations per chunk, whatever its size). Rounding to the nearest code is a table lookup indexed by the
top 16 bits of each float (see parallel.lowbit.quant.RoundingTables). `CompiledChunkKernel` runs the same
function through `torch.compile` with a one-time, loud fallback to eager.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from parallel.lowbit.quant import create_dynamic_map, rounding_tables

SIGNED_MAP = create_dynamic_map(signed=True)
UNSIGNED_MAP = create_dynamic_map(signed=False)
SIGNED_ZERO = int((SIGNED_MAP == 0).nonzero())  # 127; the unsigned map's zero is code 0


@dataclass(frozen=True)
class MomentTables:
    """The two code books side by side, so that m and v are decoded and encoded by the same operations:
    `code` holds the signed map then the unsigned one (512 values), `cell_code`/`cell_threshold` the
    signed map's 65,536 cells then the unsigned map's (see parallel.lowbit.quant.RoundingTables), each rotated
    by 32,768 so that the top 16 bits of a float read as a *signed* number, plus 32,768, index them."""

    code: torch.Tensor
    cell_code: torch.Tensor
    cell_threshold: torch.Tensor

    @staticmethod
    def build(device: torch.device) -> MomentTables:
        signed, unsigned = rounding_tables(SIGNED_MAP, device), rounding_tables(UNSIGNED_MAP, device)
        return MomentTables(
            torch.cat([signed.code, unsigned.code]),
            torch.cat([signed.cell_code.roll(32768), unsigned.cell_code.roll(32768)]),
            torch.cat([signed.cell_threshold.roll(32768), unsigned.cell_threshold.roll(32768)]),
        )


def adamw8bit_chunk(
    g: torch.Tensor,
    codes1: torch.Tensor,
    absmax1: torch.Tensor,
    codes2: torch.Tensor,
    absmax2: torch.Tensor,
    tables: MomentTables,
    beta1: float | torch.Tensor,
    beta2: float | torch.Tensor,
    eps: float | torch.Tensor,
    bias_correction2_sqrt: float | torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """One AdamW step on a chunk of whole blocks: all tensors flat, g zero in the padding.

    Returns (u, codes1, absmax1, codes2, absmax2): the new quantized moments and the update direction
    u = m / (sqrt(v) / sqrt(1 - beta2^t) + eps), to be applied as p -= lr / (1 - beta1^t) * u.
    `bias_correction2_sqrt` is a scalar or one value per block, shape (n_blocks, 1). Scalars are numbers
    (eager) or 0-d tensors (compiled, so that new values do not recompile). m and v travel
    stacked, shape (2, n_blocks, B), through decoding, absmax and encoding (half the operations).
    """
    n_blocks = absmax1.numel()
    g = g.view(n_blocks, -1)
    codes = torch.stack([codes1.view(n_blocks, -1), codes2.view(n_blocks, -1)])
    absmax = torch.stack([absmax1, absmax2]).unsqueeze(2)
    index = codes.long()
    index[1] += 256  # the unsigned map follows the signed one in `tables.code`
    moments = tables.code.index_select(0, index.view(-1)).view(codes.shape).mul_(absmax)
    m, v = moments[0], moments[1]
    m.lerp_(g, 1 - beta1)
    if torch.is_tensor(beta2):  # the compiled path passes 0-d tensors; addcmul_ takes a number only
        v.mul_(beta2).add_(g * g * (1 - beta2))
    else:
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    u = m / v.sqrt().div_(bias_correction2_sqrt).add_(eps)
    new_absmax = moments.abs().amax(dim=2)
    scale = torch.where(new_absmax > 0, new_absmax, torch.ones_like(new_absmax)).unsqueeze(2)
    normalized = moments.div_(scale)
    # the top 16 bits of each float32, as a signed number (arithmetic shift), shifted into the rotated
    # tables of the signed (m) and unsigned (v) maps
    cell = normalized.view(torch.int32) >> 16
    cell[0] += 32768
    cell[1] += 32768 + 65536
    cell = cell.view(-1)
    new_codes = tables.cell_code.index_select(0, cell).view(codes.shape)
    new_codes.add_(normalized > tables.cell_threshold.index_select(0, cell).view(codes.shape))
    return u.view(-1), new_codes[0].view(-1), new_absmax[0], new_codes[1].view(-1), new_absmax[1]


class CompiledChunkKernel:
    """`adamw8bit_chunk` through torch.compile, with a loud, one-time eager fallback.

    Static shapes: one compilation per distinct chunk size (the full chunk and each group's last one),
    because on CPU the dynamic-shape kernel measured 5x slower than the static one. Learning rate and
    step enter as unspecialised floats and never recompile."""

    def __init__(self) -> None:
        self.compiled: Callable[..., tuple[torch.Tensor, ...]] | None = torch.compile(
            adamw8bit_chunk, dynamic=False
        )

    def __call__(self, *args) -> tuple[torch.Tensor, ...]:
        if self.compiled is not None:
            # scalars as 0-d tensors: graph inputs, not constants baked into the graph
            device = args[0].device
            scalars = [a if torch.is_tensor(a) else torch.tensor(a, device=device) for a in args[6:]]
            try:
                return self.compiled(*args[:6], *scalars)
            except Exception as error:  # noqa: BLE001 - any compiler failure: report it and go eager
                warnings.warn(
                    f"AdamW8bit(compile=True): torch.compile failed ({type(error).__name__}: {error}); "
                    "running the eager kernel instead",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self.compiled = None
        return adamw8bit_chunk(*args)
