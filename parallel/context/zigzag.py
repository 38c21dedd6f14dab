"""The zigzag ("head-tail") split of a sequence over the cp ranks of a context-parallel group.

A sequence of s tokens is cut into 2 cp pieces of s / (2 cp) tokens; rank r holds pieces r and
2 cp - 1 - r, in that order:

    cp = 2, s = 8:   pieces [0 1 | 2 3 | 4 5 | 6 7]    rank 0: pieces 0, 3 -> tokens 0 1 6 7
                                                       rank 1: pieces 1, 2 -> tokens 2 3 4 5

Under a causal mask query piece i attends to key pieces 0..i, so piece i costs i + 1 piece-pairs; rank r
does (r + 1) + (2 cp - r) = 2 cp + 1 of them whatever r is: every rank does the same attention work (a
plain split in cp contiguous chunks would leave the last rank with 2 cp - 1 times the work of the first).

Concatenating the local parts of ranks 0..cp-1 (an all-gather along the sequence) gives the "gathered
order": block 2k is piece k and block 2k + 1 is piece 2 cp - 1 - k. `gathered_pieces` names the piece of
each block and `zigzag_merge` puts a gathered tensor back in sequence order.
"""

from __future__ import annotations

import torch


def rank_pieces(rank: int, cp: int) -> tuple[int, int]:
    """The two pieces (of 2 cp) rank `rank` holds, in local order."""
    return rank, 2 * cp - 1 - rank


def gathered_pieces(cp: int) -> list[int]:
    """Piece index of each of the 2 cp blocks of a gathered tensor (ranks 0..cp-1, two blocks each)."""
    return [piece for rank in range(cp) for piece in rank_pieces(rank, cp)]


def _check(length: int, cp: int) -> int:
    if length % (2 * cp):
        raise ValueError(
            f"sequence length {length} is not divisible by 2 x cp = {2 * cp} (zigzag context-parallel split)"
        )
    return length // (2 * cp)


def zigzag_split(x: torch.Tensor, dim: int, rank: int, cp: int) -> torch.Tensor:
    """Rank `rank`'s part of `x` along `dim`: pieces r and 2 cp - 1 - r concatenated (a copy)."""
    if cp == 1:
        return x
    piece = _check(x.shape[dim], cp)
    a, b = rank_pieces(rank, cp)
    return torch.cat([x.narrow(dim, a * piece, piece), x.narrow(dim, b * piece, piece)], dim)


def zigzag_merge(gathered: torch.Tensor, dim: int, cp: int) -> torch.Tensor:
    """The inverse of splitting then gathering: `gathered` (the local parts of ranks 0..cp-1
    concatenated along `dim`) back in sequence order."""
    if cp == 1:
        return gathered
    blocks = gathered.chunk(2 * cp, dim)
    order = sorted(range(2 * cp), key=gathered_pieces(cp).__getitem__)
    return torch.cat([blocks[i] for i in order], dim)


def zigzag_positions(local_length: int, rank: int, cp: int, device=None) -> torch.Tensor:
    """Sequence index (0..s-1) of each of rank `rank`'s `local_length` tokens, s = local_length x cp."""
    full = torch.arange(local_length * cp, device=device)
    return zigzag_split(full, 0, rank, cp)
