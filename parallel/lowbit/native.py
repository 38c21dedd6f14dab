"""The native CPU kernels of `parallel.lowbit` (csrc/lowbit.c): built at first use, loaded with ctypes.

`csrc/lowbit.c` is plain C99 (no torch headers) and holds one fused pass per block for AdamW8bit and
for NF4 dequantize, written to give the same bits as the eager torch code they replace. At first use it
is compiled with the system C compiler (`$CC`, else `cc`) into a per-user cache directory
(`$XDG_CACHE_HOME/parallel-lowbit`, else `~/.cache/parallel-lowbit`), under a name that hashes the
source, the flags, the compiler's version and this CPU's identity (so that `-march=native` code never
runs on another CPU), behind a file lock so that concurrent processes build it once, and renamed into
place atomically. A build takes well under a second.

No compiler, or a build that fails: one warning naming the reason, and `library()` returns None; callers
then run their eager torch code (which stays tested against the native kernels bit for bit).

Threads: `run_blocks` shares the blocks of one call among `torch.get_num_threads()` threads (the caller
and pool threads; ctypes releases the GIL during the call), in work units taken from a shared atomic
counter, so a thread on a busy core takes fewer units instead of holding up the others.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "lowbit.c"
# -ffp-contract=off: no multiply-add is fused unless the source says fmaf (bit-identity with eager torch)
FLAGS = ["-O3", "-std=gnu99", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]
NATIVE_FLAGS = ["-march=native"]  # tried first; the cache key holds the CPU identity

_LIBRARY: list[ctypes.CDLL | None] = []  # [] until the first call to library()
_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}  # by (process id, threads)


class MomentTables(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("sc", "scc", "sct", "uc", "ucc", "uct")]


class AdamWScalars(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_float) for name in ("w1", "beta2", "w2", "bc2", "eps", "decay", "neg_step")),
        ("fused", ctypes.c_int32),
    ]


class NF4Args(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("packed", "absmax", "codes", "dynamic", "scale", "group")),
        ("offset", ctypes.c_float),
        ("out_kind", ctypes.c_int32),
        ("nf4_code", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        *((name, ctypes.c_int64) for name in ("numel", "block_size", "n_blocks")),
    ]


class VectorSqrt(ctypes.Structure):
    _fields_ = [("function", ctypes.c_void_p), ("mode", ctypes.c_int64)]


def _cpu_identity() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({x for x in lines if x.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "parallel-lowbit"


def _compile(compiler: str, flags: list[str], target: Path) -> None:
    """Compile SOURCE into `target` through a temporary file in the same directory and an atomic rename."""
    fd, temporary = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *flags, "-o", temporary, str(SOURCE), "-lm"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _build() -> Path:
    compiler = os.environ.get("CC", "cc")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    last_error: subprocess.CalledProcessError | None = None
    for flags in (FLAGS + NATIVE_FLAGS, FLAGS):
        key = hashlib.sha256(
            "\0".join([SOURCE.read_text(), " ".join(flags), version, _cpu_identity()]).encode()
        ).hexdigest()[:24]
        cache = _cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        target = cache / f"lowbit-{key}.so"
        if target.exists():
            return target
        with open(cache / f"lowbit-{key}.lock", "w") as lock:
            try:
                import fcntl

                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            except ImportError:  # no POSIX locks: concurrent builds then race, each rename still atomic
                pass
            if target.exists():  # another process built it while this one waited
                return target
            try:
                _compile(compiler, flags, target)
                return target
            except subprocess.CalledProcessError as error:
                last_error = error
    raise RuntimeError(f"{compiler} failed: {(last_error.stderr or '').strip()[:300]}")


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.adamw8bit_step.argtypes = [p, p, i64, p, p, p, p, i64, i64, p, p, p, p, i64]
    lib.nf4_dequantize.argtypes = [p, p, i64]
    for function in (lib.adamw8bit_step, lib.nf4_dequantize):
        function.restype = ctypes.c_int
    lib.sqrt_all.argtypes = [p, i64, p, p]
    lib.sqrt_all.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on the first call; None (after one warning) if that fails."""
    if not _LIBRARY:
        try:
            _LIBRARY.append(_declare(ctypes.CDLL(str(_build()))))
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            warnings.warn(
                f"parallel.lowbit: the native CPU kernels could not be built ({type(error).__name__}: "
                f"{error}); AdamW8bit and NF4 dequantize run their slower eager torch code instead",
                RuntimeWarning,
                stacklevel=2,
            )
            _LIBRARY.append(None)
    return _LIBRARY[0]


def fused_multiply_add() -> bool:
    """Whether ATen's vectorised CPU kernels (lerp, add with alpha) fuse their multiply-add, as they do
    with any SIMD instruction set (AVX2, AVX-512, NEON, SVE); not in the DEFAULT (scalar) build."""
    return torch.backends.cpu.get_cpu_capability() != "DEFAULT"


# MKL's vmsSqrt with the mode ATen passes it (VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE)
_MKL_SQRT_MODE = 0x2 | 0x140000 | 0x100
_SQRT: list[VectorSqrt | None] = []


def vector_sqrt(lib: ctypes.CDLL) -> VectorSqrt | None:
    """The float32 sqrt that gives torch.sqrt's bits on this torch build: ATen's own MKL vmsSqrt (torch
    builds with MKL, where it is not always correctly rounded) when libtorch exports it, else sqrtf;
    chosen by comparing both with torch.sqrt on 2^16 values over 40 binades. None if neither matches."""
    if not _SQRT:
        candidates = [VectorSqrt(None, 0)]
        try:
            mkl = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")).vmsSqrt
            candidates.insert(0, VectorSqrt(ctypes.cast(mkl, ctypes.c_void_p).value, _MKL_SQRT_MODE))
        except (OSError, AttributeError):
            pass
        probe = torch.exp2(torch.rand(2**16, generator=torch.Generator().manual_seed(0)) * 40 - 30)
        expected = torch.sqrt(probe)
        _SQRT.append(None)
        for candidate in candidates:
            out = torch.empty_like(probe)
            lib.sqrt_all(ctypes.byref(candidate), probe.numel(), probe.data_ptr(), out.data_ptr())
            if torch.equal(out, expected):
                _SQRT[0] = candidate
                break
    return _SQRT[0]


def run_blocks(function, args: list, n_blocks: int, grain: int) -> None:
    """`function(*args, counter, grain)` on as many threads as torch uses, sharing the blocks (module doc)."""
    counter = ctypes.c_int64(0)
    call_args = [*args, ctypes.byref(counter), grain]
    threads = min(torch.get_num_threads(), -(-n_blocks // grain))
    if threads <= 1:
        codes = [function(*call_args)]
    else:
        key = (os.getpid(), threads)
        pool = _POOLS.get(key) or _POOLS.setdefault(key, ThreadPoolExecutor(threads - 1, "lowbit"))
        futures = [pool.submit(function, *call_args) for _ in range(threads - 1)]
        codes = [function(*call_args)] + [f.result() for f in futures]
    if any(codes):
        raise MemoryError("parallel.lowbit native kernel: out of memory for its block buffer")


def pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
