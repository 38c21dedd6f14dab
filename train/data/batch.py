"""A training batch: input ids, next-token targets (``-100`` ignored) and optional document ids.

A plain window of ``seq_len + 1`` tokens gives ``inputs = w[:, :-1]`` and ``targets = w[:, 1:]``. Masked
formats (chat, instruction) set the targets of tokens that are not trained on to ``-100``; packed
documents carry ``document_ids`` so that attention stays inside each document and RoPE positions restart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from parallel.context import zigzag_split

IGNORE_INDEX = -100


@dataclass
class TokenBatch:
    """Rows of one step: ``inputs``, ``targets`` and ``document_ids`` (or None), all (rows, seq)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    document_ids: torch.Tensor | None = None

    @classmethod
    def of(cls, batch: TokenBatch | torch.Tensor | np.ndarray) -> TokenBatch:
        """A TokenBatch as is, or one from windows of ``seq_len + 1`` tokens (every target counted)."""
        if isinstance(batch, TokenBatch):
            return batch
        batch = torch.as_tensor(batch)
        return cls(batch[:, :-1], batch[:, 1:])

    @property
    def rows(self) -> int:
        return self.inputs.shape[0]

    def split(self, parts: int) -> list[TokenBatch]:
        """``parts`` consecutive micro-batches of equal size."""
        if self.rows % parts:
            raise ValueError(f"batch of {self.rows} rows does not split into {parts} micro-batches")
        size = self.rows // parts
        ids = [None] * parts if self.document_ids is None else self.document_ids.split(size)
        return [
            TokenBatch(i, t, d)
            for i, t, d in zip(self.inputs.split(size), self.targets.split(size), ids, strict=True)
        ]

    def select(self, start: int, stop: int) -> TokenBatch:
        ids = None if self.document_ids is None else self.document_ids[start:stop]
        return TokenBatch(self.inputs[start:stop], self.targets[start:stop], ids)

    def context_piece(self, rank: int, cp: int) -> TokenBatch:
        """Context-parallel rank `rank`'s zigzag pieces of every row (parallel/context/zigzag.py)."""
        if cp == 1:
            return self
        ids = None if self.document_ids is None else zigzag_split(self.document_ids, 1, rank, cp)
        return TokenBatch(
            zigzag_split(self.inputs, 1, rank, cp), zigzag_split(self.targets, 1, rank, cp), ids
        )

    def to(self, device: torch.device) -> TokenBatch:
        ids = None if self.document_ids is None else self.document_ids.to(device)
        return TokenBatch(self.inputs.to(device), self.targets.to(device), ids)

    def counted(self) -> int:
        """How many targets count in the loss (not ``-100``)."""
        return int((self.targets != IGNORE_INDEX).sum())

    def extras(self) -> dict:
        """Keyword arguments for the model's forward and loss."""
        return {} if self.document_ids is None else {"document_ids": self.document_ids}
