"""Batches of documents: packed windows with document masking, one document per row, and mixtures.

Packing (``packing=True``): the token stream of a source (documents each ending with the end-of-text
token) is cut into consecutive windows of ``seq_len + 1`` tokens; the batch at step k draws, per row, a
source (with probability proportional to its weight) and a window of it, from
``default_rng([seed, k])`` alone, so the global batch is a pure function of (seed, step) whatever the
layout. Without packing a row is one document from its start, truncated to ``seq_len + 1`` tokens or
padded with end-of-text tokens whose targets are ignored.

Labels (``label_windows``): ``targets[t] = row[t + 1]``, or ``-100`` where that token is not trained on
(its mask is 0). With document masking, ``document_ids[t]`` counts the end-of-text tokens before t, so
each document attends only to itself with RoPE positions restarting at 0 (``models.mla.document_attention``),
and the target after an end-of-text token (the next document's first token, which nothing in the
document can predict) is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from train.data.batch import IGNORE_INDEX, TokenBatch


@dataclass
class Source:
    """One corpus of a mixture: its token stream, its loss mask (None: every token trained) and weight."""

    tokens: np.ndarray
    mask: np.ndarray | None = None
    weight: float = 1.0


def label_windows(
    rows: np.ndarray, mask_rows: np.ndarray | None, eot_id: int, document_masking: bool
) -> TokenBatch:
    """A TokenBatch of windows (rows, seq_len + 1) and their masks (1: trained), as the module says."""
    rows = np.asarray(rows, dtype=np.int64)
    inputs, targets = rows[:, :-1], rows[:, 1:].copy()
    if mask_rows is not None:
        targets[np.asarray(mask_rows)[:, 1:] == 0] = IGNORE_INDEX
    ids = None
    if document_masking:
        ends = inputs == eot_id
        targets[ends] = IGNORE_INDEX
        ids = torch.from_numpy(np.cumsum(ends, axis=1) - ends)
    return TokenBatch(torch.from_numpy(np.ascontiguousarray(inputs)), torch.from_numpy(targets), ids)


class DocumentSampler:
    """The batch of a step from one or more sources (see the module docstring)."""

    def __init__(
        self,
        sources: list[Source],
        seq_len: int,
        global_batch_size: int,
        seed: int,
        eot_id: int,
        packing: bool = True,
        document_masking: bool = True,
    ) -> None:
        if not sources:
            raise ValueError("data.mixture: needs at least one source")
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        if (weights <= 0).any() or not np.isfinite(weights).all():
            raise ValueError(f"data.mixture weights {weights.tolist()}: every weight must be > 0")
        self.sources, self.probabilities = sources, weights / weights.sum()
        self.seq_len, self.global_batch_size, self.seed = seq_len, global_batch_size, seed
        self.eot_id, self.packing, self.document_masking = eot_id, packing, document_masking
        self.starts = []
        for i, s in enumerate(sources):
            if len(s.tokens) < seq_len + 1 and packing:
                raise ValueError(
                    f"data.seq_len={seq_len}: source {i} has {len(s.tokens)} tokens, fewer than one window "
                    f"of seq_len + 1"
                )
            ends = np.flatnonzero(np.asarray(s.tokens) == eot_id) if not packing else None
            self.starts.append(None if ends is None else np.concatenate([[0], ends[:-1] + 1]))

    def choices(self, step: int, seq_len: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, window or document index) of every row of the global batch of ``step``."""
        rng = np.random.default_rng([self.seed, step])
        source = rng.choice(len(self.sources), size=batch_size, p=self.probabilities)
        counts = [
            (len(s.tokens) - 1) // seq_len if self.packing else len(self.starts[i])
            for i, s in enumerate(self.sources)
        ]
        draws = rng.random(batch_size)
        index = (draws * np.array(counts)[source]).astype(np.int64)
        return source, index

    def _row(self, source: int, index: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.sources[source]
        if self.packing:
            start, stop = index * seq_len, index * seq_len + seq_len + 1
        else:
            start = int(self.starts[source][index])
            stop = min(start + seq_len + 1, len(s.tokens))
        tokens = np.full(seq_len + 1, self.eot_id, dtype=np.int64)
        mask = np.zeros(seq_len + 1, dtype=np.uint8)
        tokens[: stop - start] = s.tokens[start:stop]
        mask[: stop - start] = 1 if s.mask is None else s.mask[start:stop]
        if not self.packing:  # nothing after the document's end-of-text token is trained on
            after = np.flatnonzero(tokens == self.eot_id)
            if len(after):
                mask[after[0] + 1 :] = 0
        return tokens, mask

    def global_batch(
        self, step: int, seq_len: int | None = None, batch_size: int | None = None
    ) -> TokenBatch:
        return self.local_batch(step, 0, 1, seq_len, batch_size)

    def local_batch(
        self,
        step: int,
        dp_rank: int,
        dp_size: int,
        seq_len: int | None = None,
        batch_size: int | None = None,
    ) -> TokenBatch:
        """Rows ``[dp_rank * B / dp_size, (dp_rank + 1) * B / dp_size)`` of the global batch of ``step``."""
        seq_len = self.seq_len if seq_len is None else seq_len
        batch_size = self.global_batch_size if batch_size is None else batch_size
        if batch_size % dp_size:
            raise ValueError(f"train.global_batch_size={batch_size} is not divisible by dp_size={dp_size}")
        rows = batch_size // dp_size
        source, index = self.choices(step, seq_len, batch_size)
        pick = slice(dp_rank * rows, (dp_rank + 1) * rows)
        built = [self._row(int(s), int(i), seq_len) for s, i in zip(source[pick], index[pick], strict=True)]
        tokens = np.stack([t for t, _ in built])
        masks = np.stack([m for _, m in built])
        return label_windows(tokens, masks, self.eot_id, self.document_masking)
