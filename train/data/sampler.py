"""A layout-independent batch sampler and the validation windows.

Sampling is stateless: the global batch at step k is a pure function of (seed, k, tokens, seq_len,
global_batch_size), and data-parallel rank r of d takes rows [r*B/d, (r+1)*B/d) of it, so the batch a step
trains on does not depend on the parallel layout.
"""

from __future__ import annotations

import numpy as np


class BatchSampler:
    """Random windows of ``seq_len + 1`` tokens; the batch at a step depends only on (seed, step).

    Row i of ``global_batch(step)`` is ``tokens[o_i : o_i + seq_len + 1]`` with offsets
    ``o ~ default_rng([seed, step]).integers(0, len(tokens) - seq_len, size=global_batch_size)``.
    A step may ask for another length and number of rows (a sequence-length curriculum): the same rule
    with those values, still a pure function of (seed, step, seq_len, batch_size).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch_size: int, seed: int):
        if seq_len < 1:
            raise ValueError(f"data.seq_len={seq_len}: must be >= 1")
        if global_batch_size < 1:
            raise ValueError(f"train.global_batch_size={global_batch_size}: must be >= 1")
        if seed < 0:
            raise ValueError(f"train.seed={seed}: must be >= 0")
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"data.seq_len={seq_len}: a window needs seq_len + 1 = {seq_len + 1} tokens but only "
                f"{len(tokens)} are available"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.seed = seed

    def _shape(self, seq_len: int | None, batch_size: int | None) -> tuple[int, int]:
        seq_len = self.seq_len if seq_len is None else seq_len
        batch_size = self.global_batch_size if batch_size is None else batch_size
        if not 1 <= seq_len < len(self.tokens):
            raise ValueError(f"seq_len={seq_len}: must be in [1, {len(self.tokens) - 1}] for these tokens")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        return seq_len, batch_size

    def _offsets(self, step: int, seq_len: int | None = None, batch_size: int | None = None) -> np.ndarray:
        if step < 0:
            raise ValueError(f"step={step}: must be >= 0")
        seq_len, batch_size = self._shape(seq_len, batch_size)
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - seq_len, size=batch_size)

    def _rows(self, offsets: np.ndarray, seq_len: int | None = None) -> np.ndarray:
        seq_len = self.seq_len if seq_len is None else seq_len
        index = offsets[:, None] + np.arange(seq_len + 1)
        return np.array(self.tokens[index], dtype=np.int64)

    def global_batch(
        self, step: int, seq_len: int | None = None, batch_size: int | None = None
    ) -> np.ndarray:
        """The ``(batch_size, seq_len + 1)`` int64 batch of ``step`` (defaults: the sampler's)."""
        return self._rows(self._offsets(step, seq_len, batch_size), seq_len)

    def local_batch(
        self,
        step: int,
        dp_rank: int,
        dp_size: int,
        seq_len: int | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Rows ``[dp_rank * B / dp_size, (dp_rank + 1) * B / dp_size)`` of ``global_batch(step)``, B the
        batch size."""
        rows_total = self.global_batch_size if batch_size is None else batch_size
        if dp_size < 1 or rows_total % dp_size:
            key = "train.global_batch_size" if batch_size is None else "batch_size"
            raise ValueError(f"{key}={rows_total} is not divisible by dp_size={dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank}: must be in [0, dp_size={dp_size})")
        rows = rows_total // dp_size
        offsets = self._offsets(step, seq_len, batch_size)
        return self._rows(offsets[dp_rank * rows : (dp_rank + 1) * rows], seq_len)


def validation_windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> np.ndarray:
    """Consecutive windows ``tokens[i*seq_len : i*seq_len + seq_len + 1]`` from the start, at most
    ``max_windows`` of them, as an ``(n, seq_len + 1)`` int64 array with ``n >= 1``."""
    if seq_len < 1:
        raise ValueError(f"data.seq_len={seq_len}: must be >= 1")
    if max_windows < 1:
        raise ValueError(f"max_windows={max_windows}: must be >= 1")
    n = min((len(tokens) - 1) // seq_len, max_windows)
    if n < 1:
        raise ValueError(
            f"data.seq_len={seq_len}: the validation split has only {len(tokens)} tokens, fewer than one "
            f"window of seq_len + 1 = {seq_len + 1}"
        )
    index = (np.arange(n) * seq_len)[:, None] + np.arange(seq_len + 1)
    return np.array(tokens[index], dtype=np.int64)
