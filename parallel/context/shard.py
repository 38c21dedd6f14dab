"""What a cp rank knows about its tokens: the context-parallel group, their RoPE positions, and the
document ids that mask attention (its own tokens' and the whole sequence's, in gathered order).

Built once per forward (`context_shard`) from the local token count and, for packed documents, the local
document ids. Positions restart at each document (`document_positions`); a document may start on
another rank, so the ids of the whole sequence are gathered (integers, a few bytes per token), put back
in sequence order for the positions, and kept in gathered order for the mask, which then matches the
gathered latents block for block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.collectives import gather_from_group, group_rank, group_size
from parallel.context.zigzag import zigzag_merge, zigzag_positions, zigzag_split


@dataclass
class ContextShard:
    """This rank's place in a context-parallel sequence.

    `positions`: RoPE positions of the local tokens, (s_local,) or (batch, s_local) with documents.
    `query_documents` (batch, s_local) and `key_documents` (batch, s_local x cp, gathered order): the
    document ids of the local queries and of every key, or None (plain causal attention). `ring`: pass
    the latents round a ring (`ring.py`) instead of gathering them (`exchange.py`)."""

    group: dist.ProcessGroup | None
    rank: int
    size: int
    positions: torch.Tensor
    query_documents: torch.Tensor | None = None
    key_documents: torch.Tensor | None = None
    ring: bool = False


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """positions[b, t] = t - (start of t's document): RoPE positions that restart at 0 in each run of
    equal ids in `document_ids` (batch, seq)."""
    index = torch.arange(document_ids.shape[1], device=document_ids.device)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def context_shard(
    local_length: int,
    group: dist.ProcessGroup | None,
    document_ids: torch.Tensor | None = None,
    device: torch.device | None = None,
    ring: bool = False,
) -> ContextShard:
    """The shard of a rank holding `local_length` tokens (its two zigzag pieces) of a sequence split over
    `group`; `document_ids` (batch, local_length) are this rank's, in local order."""
    cp, rank = group_size(group), group_rank(group)
    index = zigzag_positions(local_length, rank, cp, device)
    if document_ids is None:
        return ContextShard(group, rank, cp, index, ring=ring)
    if document_ids.shape[1] != local_length:
        raise ValueError(
            f"document_ids of shape {tuple(document_ids.shape)}: expected this rank's {local_length} tokens"
        )
    with torch.no_grad():
        gathered = gather_from_group(document_ids.contiguous(), 1, group)
    positions = zigzag_split(document_positions(zigzag_merge(gathered, 1, cp)), 1, rank, cp)
    return ContextShard(group, rank, cp, positions, document_ids, gathered, ring)
