"""The latent exchange: every cp rank gets the compressed KV state of the whole sequence.

MLA's keys and values are computed from a per-token latent, the same for every head:

    [c_kv, k_pe] = h W_kva          c = RMSNorm(c_kv)  (kv_lora_rank)     k_pe: RoPE'd shared key (d_rope)
    [k_nope, v]  = c W_kvb          per head: num_heads x (d_nope + d_v)

so a rank whose queries must see another rank's tokens needs only (c, RoPE(k_pe)) of those tokens,
kv_lora_rank + d_rope numbers per token (576 for DeepSeek-V2), and up-projects them itself, instead of
their keys and values, num_heads x (d_nope + d_rope + d_v) numbers (128 x 320 = 40,960 for
DeepSeek-V2: 71x more). k_pe is rotated before the exchange, with the token's true position, so the
receiver needs no positions (RoPE is applied once per token, where the token lives).

`exchange_latents` is an all-gather along the sequence over the cp group (the alternative to passing the
latents round a ring, `ring.py`, which measured faster and is MLA's default); its backward is the
adjoint, a reduce-scatter: the gradient of every gathered token, summed over the ranks whose queries used
it, goes back to the rank that owns the token. Each rank receives (cp - 1)/cp of the sequence's latents,
which is also the least any scheme can move (every query must see every earlier token's state once).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.collectives import gather_from_sequence_parallel


def exchange_latents(
    latent: torch.Tensor, k_rope: torch.Tensor, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather (batch, s_local, kv_lora_rank) latents and (batch, s_local, d_rope) rotated shared keys
    along the sequence, in one message (the latent cast to the key's dtype, as the up-projection would);
    backward reduce-scatters their gradients to the owners."""
    rank = latent.shape[-1]
    both = torch.cat([latent.to(k_rope.dtype), k_rope], dim=-1)
    gathered = gather_from_sequence_parallel(both, 1, group)
    return gathered.split([rank, k_rope.shape[-1]], dim=-1)


def latent_numbers_per_token(kv_lora_rank: int, d_rope: int) -> int:
    """Numbers one token's latent exchange carries: c and RoPE(k_pe)."""
    return kv_lora_rank + d_rope


def kv_numbers_per_token(heads: int, d_nope: int, d_rope: int, d_v: int) -> int:
    """Numbers one token's key/value exchange (ring attention on full heads) carries: K and V of every
    head."""
    return heads * (d_nope + d_rope + d_v)


def exchange_bytes_per_rank(seq_len: int, cp: int, numbers_per_token: int, bytes_per_number: int) -> int:
    """Bytes one rank receives to see the whole sequence: the (cp - 1)/cp of the tokens it does not hold
    (the derived minimum; an all-gather moves exactly this, a ring too, in cp - 1 steps)."""
    return seq_len * (cp - 1) // cp * numbers_per_token * bytes_per_number
