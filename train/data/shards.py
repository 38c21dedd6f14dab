"""Token files in shards: a read-only view of several memory-mapped arrays as one.

A split larger than `SHARD_TOKENS` is written as `{split}-00000.bin`, `{split}-00001.bin`, ... (and the
same for its mask), so no single file grows without bound and shards can be copied or checked one by
one. `ShardedArray` concatenates them virtually: `len`, integer, slice and integer-array indexing, and
`numpy.asarray` (which does copy everything: only for small arrays).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 tokens per shard


def shard_name(split: str, index: int, mask: bool = False) -> str:
    return f"{split}-{index:05d}{'.mask' if mask else ''}.bin"


class ShardedArray:
    """The concatenation of `parts` (1-D arrays, e.g. memmaps), read-only, without copying them."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0, *(len(p) for p in parts)])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.concatenate(self.parts)
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            return self._take(np.arange(start, stop, step))
        if isinstance(key, (int, np.integer)):
            return self._take(np.array([key]))[0]
        return self._take(np.asarray(key))

    def _take(self, index: np.ndarray) -> np.ndarray:
        flat = index.ravel()
        flat = np.where(flat < 0, flat + len(self), flat)
        if len(flat) and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} tokens")
        shard = np.searchsorted(self.offsets, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=self.dtype)
        for s in np.unique(shard):
            chosen = shard == s
            out[chosen] = self.parts[s][flat[chosen] - self.offsets[s]]
        return out.reshape(index.shape)

    def sum(self) -> int:
        return int(sum(int(np.asarray(p, dtype=np.int64).sum()) for p in self.parts))


def open_split(folder: Path, split: str, sidecar: dict, mask: bool) -> np.ndarray | ShardedArray | None:
    """The memory-mapped tokens (or mask) of a split: one file, or its shards from the sidecar."""
    dtype = np.uint8 if mask else sidecar["dtype"]
    sizes = sidecar.get("shards")
    if sizes is None:
        path = folder / f"{split}{'.mask' if mask else ''}.bin"
        if not path.is_file():
            return None
        return np.memmap(path, dtype=dtype, mode="r", shape=(sidecar["num_tokens"],))
    paths = [folder / shard_name(split, i, mask) for i in range(len(sizes))]
    if not all(p.is_file() for p in paths):
        return None
    parts = [np.memmap(p, dtype=dtype, mode="r", shape=(n,)) for p, n in zip(paths, sizes, strict=True)]
    return parts[0] if len(parts) == 1 else ShardedArray(parts)
