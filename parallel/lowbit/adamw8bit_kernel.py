"""The per-chunk arithmetic of AdamW8bit: one step on a flat run of whole blocks, decoded and re-encoded.

For a chunk of n blocks of B values, with m8, v8 the 8-bit codes and a1, a2 the fp32 block absmaxes:

    m, v   = code_signed[m8] * a1, code_unsigned[v8] * a2          (per block)
    m      = beta1 m + (1 - beta1) g,      v = beta2 v + (1 - beta2) g^2
    u      = m / (sqrt(v) / sqrt(1 - beta2^t) + eps)               returned; the caller applies p -= lr_t u
    a1, a2 = max |m|, max |v| per block;   m8, v8 = nearest code of m / a1, v / a2

m and v are decoded and encoded separately: their uint8 codes are widened to int32 (never int64) to
index the 256-entry code books, and rounding to the nearest code is a lookup indexed by the top 16 bits
of each float (see parallel.lowbit.quant.RoundingTables), written once and then updated in place.
`run_chunks` shares the chunks among single-threaded worker threads on a multi-threaded CPU.
`CompiledChunkKernel` runs the same function through `torch.compile` with a one-time, loud fallback to
eager. `native_step` does a whole fp32 CPU parameter's step in the native kernel (csrc/lowbit.c), the
same operations per block in one pass; its agreement with `adamw8bit_chunk` is checked bit for bit at
first use (`_native_matches_eager`), and it is not used where it differs.
"""

from __future__ import annotations

import ctypes
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from parallel.lowbit import native
from parallel.lowbit.quant import create_dynamic_map, rounding_tables

SIGNED_MAP = create_dynamic_map(signed=True)
UNSIGNED_MAP = create_dynamic_map(signed=False)
T = TypeVar("T")
SIGNED_ZERO = int((SIGNED_MAP == 0).nonzero())  # 127; the unsigned map's zero is code 0


@dataclass(frozen=True)
class MomentTables:
    """Both code books' decode and rounding tables on one device (see parallel.lowbit.quant.RoundingTables).

    The signed map's 65,536-cell tables are rotated by 32,768, so that the top 16 bits of a float32 read
    as a *signed* number (an arithmetic shift), plus 32,768, index them. The second moment is never
    negative (v >= +0), so its top 16 bits already lie in [0, 32,768) and index the unsigned tables as
    they are."""

    signed_code: torch.Tensor
    signed_cell_code: torch.Tensor
    signed_cell_threshold: torch.Tensor
    unsigned_code: torch.Tensor
    unsigned_cell_code: torch.Tensor
    unsigned_cell_threshold: torch.Tensor

    @staticmethod
    def build(device: torch.device) -> MomentTables:
        signed, unsigned = rounding_tables(SIGNED_MAP, device), rounding_tables(UNSIGNED_MAP, device)
        # the optimizer owns its tables (copies, not views of the shared rounding-table cache), so its
        # memory is what the estimator counts whatever else uses the cache
        return MomentTables(
            signed.code.clone(),
            signed.cell_code.roll(32768),
            signed.cell_threshold.roll(32768),
            unsigned.code.clone(),
            unsigned.cell_code.clone(),
            unsigned.cell_threshold.clone(),
        )


def _decode(code: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """code[codes] * absmax per block, fp32 (n_blocks, B): uint8 codes widened to int32, never int64."""
    return code.index_select(0, codes.reshape(-1).int()).view(absmax.numel(), -1).mul_(absmax.unsqueeze(1))


def _encode(normalized: torch.Tensor, cell_code: torch.Tensor, cell_threshold: torch.Tensor, rotate: bool):
    """uint8 nearest code of each value in [-1, 1]: table[cell] + (value > threshold[cell]), where the
    cell is the top 16 bits of the float32 (shifted by 32,768 into the rotated signed tables)."""
    flat = normalized.view(-1)
    cell = flat.view(torch.int32) >> 16
    if rotate:
        cell.add_(32768)
    codes = cell_code.index_select(0, cell)
    return codes.add_(flat > cell_threshold.index_select(0, cell))


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
    (eager) or 0-d tensors (compiled, so that new values do not recompile). Every temporary is written
    once and then updated in place: about 25 passes over the chunk, no int64 index copies.
    """
    n_blocks = absmax1.numel()
    g = g.view(n_blocks, -1)
    m = _decode(tables.signed_code, codes1, absmax1).lerp_(g, 1 - beta1)
    v = _decode(tables.unsigned_code, codes2, absmax2).mul_(beta2)
    if torch.is_tensor(beta2):  # the compiled path passes 0-d tensors; addcmul_ takes a number only
        v.add_(g * g * (1 - beta2))
    else:
        v.addcmul_(g, g, value=1 - beta2)
    u = v.sqrt().div_(bias_correction2_sqrt).add_(eps)
    u = torch.div(m, u, out=u)
    new_absmax1 = m.abs().amax(dim=1)
    new_absmax2 = v.amax(dim=1)  # v >= +0, so its largest value is its largest magnitude
    m.div_(torch.where(new_absmax1 > 0, new_absmax1, 1.0).unsqueeze(1))
    v.div_(torch.where(new_absmax2 > 0, new_absmax2, 1.0).unsqueeze(1))
    new_codes1 = _encode(m, tables.signed_cell_code, tables.signed_cell_threshold, rotate=True)
    new_codes2 = _encode(v, tables.unsigned_cell_code, tables.unsigned_cell_threshold, rotate=False)
    return u.view(-1), new_codes1, new_absmax1, new_codes2, new_absmax2


NATIVE_GRAIN = 256  # blocks per work unit of the native kernel (64 Ki values at blocks of 256)
_NATIVE_CHECKED: dict[str, bool] = {}  # "ok": whether the native kernel gave eager's bits on this machine


def native_step(p: torch.Tensor, state: dict, tables: MomentTables, scalars: tuple[float, ...]) -> bool:
    """The whole AdamW8bit step of one fp32 CPU parameter in the native kernel (parallel.lowbit.native):
    per block, decode, moments, p = p decay - step_size u, new absmaxes and codes, in one pass and with
    the same float operations as `adamw8bit_chunk` followed by the optimizer's update (bit-identical).
    `scalars` = (beta1, beta2, eps, sqrt(1 - beta2^t), lr / (1 - beta1^t), decay). False, having done
    nothing, when the native kernels are unavailable or the parameter is not fp32 on the CPU."""
    lib = native.library()
    codes_and_scales = [state[key] for key in ("state1", "absmax1", "state2", "absmax2")]
    if lib is None or p.device.type != "cpu" or p.dtype != torch.float32 or not p.is_contiguous():
        return False
    if not all(t.is_contiguous() and t.device.type == "cpu" for t in codes_and_scales):
        return False
    if "ok" not in _NATIVE_CHECKED:
        _NATIVE_CHECKED["ok"] = _native_matches_eager(lib, tables)
    if not _NATIVE_CHECKED["ok"]:
        return False
    g = p.grad.reshape(-1)
    g = g if g.dtype == torch.float32 and g.is_contiguous() else g.float().contiguous()
    _native_call(lib, p.view(-1), g, codes_and_scales, tables, scalars)
    return True


def _native_call(lib, p, g, codes_and_scales, tables: MomentTables, scalars: tuple[float, ...]) -> None:
    beta1, beta2, eps, bias_correction2_sqrt, step_size, decay = scalars
    c_scalars = native.AdamWScalars(
        1 - beta1,
        beta2,
        1 - beta2,
        bias_correction2_sqrt,
        eps,
        decay,
        -step_size,
        native.fused_multiply_add(),
    )
    c_tables = native.MomentTables(
        *(t.data_ptr() for t in (tables.signed_code, tables.signed_cell_code, tables.signed_cell_threshold)),
        *(t.data_ptr() for t in (tables.unsigned_code, tables.unsigned_cell_code)),
        tables.unsigned_cell_threshold.data_ptr(),
    )
    codes1, absmax1, codes2, absmax2 = codes_and_scales
    n_blocks = absmax1.numel()
    args = [p.data_ptr(), g.data_ptr(), p.numel(), codes1.data_ptr(), absmax1.data_ptr(), codes2.data_ptr()]
    args += [absmax2.data_ptr(), n_blocks, codes1.numel() // n_blocks, ctypes.byref(c_tables)]
    args += [ctypes.byref(c_scalars), ctypes.byref(native.vector_sqrt(lib))]
    native.run_blocks(lib.adamw8bit_step, args, n_blocks, NATIVE_GRAIN)


def _native_matches_eager(lib, tables: MomentTables) -> bool:
    """One step of 64 random blocks through both kernels; the native one is used only if every bit of
    the parameter and the new state agrees (else one warning: a torch build whose arithmetic it does not
    reproduce, or no sqrt with torch's bits)."""
    ok = native.vector_sqrt(lib) is not None
    if ok:
        gen = torch.Generator().manual_seed(0)
        n = 64 * 256
        p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 0.01
        state = [torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8), torch.rand(64, generator=gen)]
        state += [
            torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8),
            torch.rand(64, generator=gen),
        ]
        state[3] *= 1e-4
        scalars = (0.9, 0.999, 1e-8, (1 - 0.999**3) ** 0.5, 1e-3 / (1 - 0.9**3), 1 - 1e-3 * 0.01)
        u, *expected = adamw8bit_chunk(g, *state, tables, *scalars[:4])
        expected_p = (p * scalars[5]).add_(u, alpha=-scalars[4])
        native_state = [t.clone() for t in state]
        _native_call(lib, p, g, native_state, tables, scalars)
        ok = torch.equal(p, expected_p) and all(map(torch.equal, native_state, expected))
    if not ok:
        warnings.warn(
            "AdamW8bit: the native CPU kernel does not reproduce the eager kernel's bits on this torch "
            "build; running the slower eager kernel",
            RuntimeWarning,
            stacklevel=4,
        )
    return ok


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


_POOLS: dict[
    tuple[int, int], ThreadPoolExecutor
] = {}  # by (process id: a forked child starts its own, threads)


def _one_thread_each(step_chunk: Callable[[T], None], chunks: list[T]) -> None:
    torch.set_num_threads(1)  # this worker's own operations run inline: no parallel region per operation
    with torch.no_grad():  # grad mode is per thread; an optimizer step runs without autograd
        for chunk in chunks:
            step_chunk(chunk)


def run_chunks(step_chunk: Callable[[T], None], chunks: list[T], device: torch.device) -> None:
    """`step_chunk` on every chunk. On a CPU with several intra-op threads the chunks are shared out
    among that many worker threads, each running its operations single-threaded (torch releases the
    GIL inside them): one fork and one join per step instead of a parallel region per operation, each
    of which waits for every core, a busy one included. Chunks are independent (disjoint state and
    parameter slices), so the result does not depend on the thread count."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or len(chunks) == 1:
        for chunk in chunks:
            step_chunk(chunk)
        return
    key = (os.getpid(), threads)
    pool = _POOLS.get(key) or _POOLS.setdefault(key, ThreadPoolExecutor(threads, "adamw8bit"))
    try:
        torch.set_num_threads(1)
        shares = [chunks[i::threads] for i in range(threads)]
        for future in [pool.submit(_one_thread_each, step_chunk, share) for share in shares if share]:
            future.result()
    finally:
        torch.set_num_threads(threads)
