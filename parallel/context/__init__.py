"""Context parallelism for MLA: the sequence split over cp ranks in zigzag pieces (`zigzag`), the
exchange of compressed latents instead of keys and values (`ring`, the default, or an all-gather,
`exchange`), the exact attention of local queries over all keys with a log-sum-exp merge (`merge`,
`attention`), and each rank's positions and document ids (`shard`). See docs/long-context.md."""

from parallel.context.attention import latent_attention
from parallel.context.exchange import exchange_latents
from parallel.context.shard import ContextShard, context_shard, document_positions
from parallel.context.zigzag import zigzag_merge, zigzag_positions, zigzag_split

__all__ = [
    "ContextShard",
    "context_shard",
    "document_positions",
    "exchange_latents",
    "latent_attention",
    "zigzag_merge",
    "zigzag_positions",
    "zigzag_split",
]
