"""Multi-head Latent Attention (DeepSeek-V2/V3), tensor-parallel by heads, and its rotary embedding.

For hidden states h (batch, seq, hidden) and H heads:

    c_q  = RMSNorm(h W_qa)                      (q_lora_rank)   replicated   [or no compression: q = h W_q]
    q    = c_q W_qb -> H x (d_nope + d_rope)                    column-parallel, split by heads
    [c_kv, k_pe] = h W_kva                      (kv_lora_rank + d_rope)  replicated
    [k_nope, v] = RMSNorm(c_kv) W_kvb -> H x (d_nope + d_v)     column-parallel, split by heads
    q_pe, k_pe rotated by RoPE (k_pe: one key shared by every head)
    o    = softmax([q_nope, q_pe] [k_nope, k_pe]^T * scale + causal) v
    out  = o W_o                                                row-parallel (one all-reduce)

scale = (d_nope + d_rope) ** -0.5, times mscale^2 under YaRN. Only c_kv and k_pe need caching at inference
(kv_lora_rank + d_rope numbers per token and layer), which is the point of MLA.

Tensor parallelism: the down-projections and their norms are replicated; their gradients are complete and
identical on every TP rank because every path from them into head-sharded computation goes through
`copy_to_group` (inside the column-parallel up-projections, and explicitly for k_pe, which bypasses
W_kvb).

RoPE follows DeepSeek's convention: the rotated pairs are adjacent dimensions (2i, 2i+1) of the rope part,
with frequency theta^(-2i/d_rope).

Decoding with the latent cache (`forward_cached`): per token and layer the cache holds RMSNorm(c_kv) and
RoPE(k_pe). Either the cached latents are decompressed by W_kvb at every step, or (absorbed weights) the
up-projection moves onto the query and the output, because for head h with W_kvb = [W_UK; W_UV]:

    q_nope . k_nope = q_nope . (W_UK c) = (W_UK^T q_nope) . c      (a query in latent space)
    sum_j p_j v_j   = W_UV (sum_j p_j c_j)                          (attend over latents, then up-project)

so attention runs over kv_lora_rank + d_rope dimensions with one key shared by every head (as in MQA),
with the same softmax scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.config import MLAConfig
from parallel.collectives import copy_to_group, group_size
from parallel.context import ContextShard, document_positions, exchange_latents, latent_attention
from parallel.context.ring import ring_latent_attention
from parallel.pipeline.deferred_wgrad import Linear
from parallel.tensor import ColumnParallelLinear, RowParallelLinear


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32.

    Under sequence parallelism (`sequence_parallel_group` set) each TP rank normalises its own slice of the
    sequence, so its weight gradient covers only those tokens: the weight enters through `copy_to_group`,
    which sums the gradient over the group and leaves it complete and identical on every rank.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.sequence_parallel_group: dist.ProcessGroup | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight
        if self.sequence_parallel_group is not None:
            weight = copy_to_group(weight, self.sequence_parallel_group)
        return weight * x32.to(x.dtype)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(scale) + 1 for scale > 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(config: MLAConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (d_rope / 2,) and the cos/sin magnitude, plain or YaRN-scaled.

    YaRN (Peng et al. 2023) interpolates low frequencies by `factor`, keeps high frequencies, and blends
    linearly in between; the band edges are the dimensions that complete `beta_fast` and `beta_slow`
    rotations over the original context length.
    """
    dim, base = config.qk_rope_head_dim, config.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    extrapolated = 1.0 / base**exponents
    scaling = config.rope_scaling
    if scaling is None:
        return extrapolated.float(), 1.0
    factor = float(scaling["factor"])
    original = int(scaling["original_max_position_embeddings"])
    beta_fast, beta_slow = float(scaling.get("beta_fast", 32)), float(scaling.get("beta_slow", 1))

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp
    inv_freq = extrapolated / factor * (1 - keep) + extrapolated * keep
    magnitude = yarn_mscale(factor, float(scaling.get("mscale", 1))) / yarn_mscale(
        factor, float(scaling.get("mscale_all_dim", 0))
    )
    return inv_freq.float(), magnitude


def softmax_scale(config: MLAConfig) -> float:
    scale = config.qk_head_dim**-0.5
    scaling = config.rope_scaling
    if scaling is not None and scaling.get("mscale_all_dim", 0):
        m = yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"]))
        scale *= m * m
    return scale


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions [0, max_seq_len), applied to adjacent pairs (2i, 2i+1)."""

    def __init__(self, config: MLAConfig) -> None:
        super().__init__()
        inv_freq, magnitude = rope_frequencies(config)
        angles = torch.outer(torch.arange(config.max_seq_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos() * magnitude, persistent=False)
        self.register_buffer("sin", angles.sin() * magnitude, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x (..., seq, d_rope): (x_2i, x_2i+1) -> (x_2i cos - x_2i+1 sin, x_2i sin + x_2i+1 cos).

        `positions` is (seq,), or (batch, seq) for x (batch, heads, seq, d_rope) when each row has its own
        positions (packed documents, each restarting at 0)."""
        cos = self.cos[positions].to(x.dtype)
        sin = self.sin[positions].to(x.dtype)
        if positions.dim() == 2:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        even, odd = x[..., 0::2], x[..., 1::2]
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
        return rotated.flatten(-2)


def document_attention(document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE positions and the attention mask of packed documents, from `document_ids` (batch, seq).

    Consecutive equal ids form one document. positions[b, t] = t - (start of t's document), so they
    restart at 0 in each document; mask[b, 0, i, j] = (j <= i) and ids[b, i] == ids[b, j]: block-diagonal
    causal attention, so no token sees another document.
    """
    index = torch.arange(document_ids.shape[1], device=document_ids.device)
    same = document_ids[:, :, None] == document_ids[:, None, :]
    causal = index[None, :] <= index[:, None]
    return document_positions(document_ids), (same & causal).unsqueeze(1)


@dataclass
class LayerCache:
    """One layer's part of the latent KV cache: `latent` (batch, max_len, kv_lora_rank) holds
    RMSNorm(c_kv), `rope` (batch, max_len, d_rope) holds RoPE(k_pe); `kv_weight`, when given (from
    `MultiHeadLatentAttention.absorbed_kv_weight`), makes attention run over the latents themselves."""

    latent: torch.Tensor
    rope: torch.Tensor
    kv_weight: torch.Tensor | None = None


class MultiHeadLatentAttention(nn.Module):
    """Causal MLA over (batch, seq, hidden); heads split over the TP group `group`."""

    def __init__(self, config: MLAConfig, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        tp = group_size(group)
        if config.num_heads % tp:
            raise ValueError(f"model.num_heads={config.num_heads} is not divisible by tp={tp}")
        self.config = config
        self.group = group
        self.local_heads = config.num_heads // tp
        self.d_nope, self.d_rope, self.d_v = (
            config.qk_nope_head_dim,
            config.qk_rope_head_dim,
            config.v_head_dim,
        )
        h, H = config.hidden_size, config.num_heads
        if config.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(h, H * config.qk_head_dim, group=group)
        else:
            self.q_a_proj = Linear(h, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = ColumnParallelLinear(config.q_lora_rank, H * config.qk_head_dim, group=group)
        self.kv_a_proj_with_mqa = Linear(h, config.kv_lora_rank + self.d_rope, bias=False)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = ColumnParallelLinear(config.kv_lora_rank, H * (self.d_nope + self.d_v), group=group)
        self.o_proj = RowParallelLinear(H * self.d_v, h, group=group)
        self.rotary = RotaryEmbedding(config)
        self.scale = softmax_scale(config)
        self.dropout = config.dropout
        self.recompute_core = False  # selective activation recompute (see _core)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        context: ContextShard | None = None,
    ) -> torch.Tensor:
        """Causal attention; with `attn_mask` (batch, 1, seq, seq), True where a query may attend (e.g.
        `document_attention` of packed documents), that mask replaces the causal one. With `context`, x
        holds this rank's zigzag pieces of a sequence split over a context-parallel group
        (`_context_parallel`)."""
        if context is not None:
            return self.o_proj(self._context_parallel(x, context))
        b, s, _ = x.shape
        heads = self.local_heads
        q_nope, q_pe = self._queries(x)
        latent = self.kv_a_proj_with_mqa(x)
        c_kv, k_pe = latent.split([self.config.kv_lora_rank, self.d_rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv))
        kv = kv.view(b, s, heads, self.d_nope + self.d_v).transpose(1, 2)
        k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)
        # k_pe reaches the local heads without passing a column-parallel layer: sum its gradient here.
        k_pe = copy_to_group(k_pe, self.group).unsqueeze(1)
        if self.recompute_core and self.training and torch.is_grad_enabled():
            out = checkpoint(
                self._core, q_nope, q_pe, k_nope, k_pe, v, positions, attn_mask, use_reentrant=False
            )
        else:
            out = self._core(q_nope, q_pe, k_nope, k_pe, v, positions, attn_mask)
        out = out.transpose(1, 2).reshape(b, s, heads * self.d_v)
        return self.o_proj(out)

    def _context_parallel(self, x: torch.Tensor, context: ContextShard) -> torch.Tensor:
        """Attention of the local tokens over the whole sequence (parallel/context/): the latents
        RMSNorm(c_kv) and RoPE(k_pe) are exchanged over the cp group and up-projected piece by piece by
        this rank's heads of W_kvb (read as `kv_b_proj(I)`, so LoRA and NF4 bases work)."""
        if self.training and self.dropout > 0:
            raise ValueError(
                f"model.dropout={self.dropout} with context parallelism (cp > 1) is not supported"
            )
        b, s, _ = x.shape
        q_nope, q_pe = self._queries(x)
        query = torch.cat([q_nope, self.rotary(q_pe, context.positions)], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.config.kv_lora_rank, self.d_rope], dim=-1)
        # both reach the head-sharded computation without a column-parallel layer: sum their gradients
        latent = copy_to_group(self.kv_a_layernorm(c_kv), self.group)
        k_pe = self.rotary(copy_to_group(k_pe, self.group).unsqueeze(1), context.positions).squeeze(1)
        eye = torch.eye(self.config.kv_lora_rank, device=x.device, dtype=k_pe.dtype)
        if context.ring:
            attend = ring_latent_attention
        else:
            attend, (latent, k_pe) = latent_attention, exchange_latents(latent, k_pe, context.group)
        out = attend(query, latent, k_pe, self.kv_b_proj(eye), context, self.scale, self.d_nope)
        return out.transpose(1, 2).reshape(b, s, self.local_heads * self.d_v)

    def _queries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_nope, q_pe) of x (batch, seq, hidden), each (batch, local_heads, seq, d), before RoPE."""
        b, s, _ = x.shape
        if self.config.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, s, self.local_heads, self.d_nope + self.d_rope).transpose(1, 2)
        return q.split([self.d_nope, self.d_rope], dim=-1)

    def _core(self, q_nope, q_pe, k_nope, k_pe, v, positions, attn_mask=None) -> torch.Tensor:
        """The attention core: RoPE, scores, softmax, dropout, weighted sum (batch, heads, seq, d_v).

        It has no parameters; with `recompute_core` (selective recompute) only its inputs are kept for
        backward and everything it builds (rotated keys and queries, softmax state) is recomputed."""
        b, heads, s, _ = q_nope.shape
        q_pe = self.rotary(q_pe, positions)
        k_pe = self.rotary(k_pe, positions).expand(b, heads, s, self.d_rope)
        query = torch.cat([q_nope, q_pe], dim=-1)
        key = torch.cat([k_nope, k_pe], dim=-1)
        return F.scaled_dot_product_attention(
            query,
            key,
            v,
            attn_mask=attn_mask,
            is_causal=attn_mask is None,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale,
        )

    @torch.no_grad()
    def absorbed_kv_weight(self) -> torch.Tensor:
        """This rank's W_kvb as (kv_lora_rank, local_heads, d_nope + d_v), the map c -> [k_nope, v] per head.

        Read by applying `kv_b_proj` to the identity, so it is the effective weight whatever the module
        holds (a plain, LoRA-adapted or NF4-quantized linear without bias)."""
        rank = self.config.kv_lora_rank
        eye = torch.eye(
            rank, device=self.kv_a_layernorm.weight.device, dtype=self.kv_a_layernorm.weight.dtype
        )
        return self.kv_b_proj(eye).view(rank, self.local_heads, self.d_nope + self.d_v)

    @torch.no_grad()
    def forward_cached(self, x: torch.Tensor, start: int, cache: LayerCache) -> torch.Tensor:
        """Attention (inference only) of new tokens x (batch, s, hidden) at positions [start, start + s).

        Their RMSNorm(c_kv) is written into `cache.latent` and their RoPE(k_pe) into `cache.rope` at
        [start, start + s); they then attend causally to every cached position [0, start + s). With
        `cache.kv_weight` attention runs in latent space; without it the cached latents are decompressed
        per head.
        """
        b, s, _ = x.shape
        heads, end = self.local_heads, start + s
        positions = torch.arange(start, end, device=x.device)
        q_nope, q_pe = self._queries(x)
        q_pe = self.rotary(q_pe, positions)

        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.config.kv_lora_rank, self.d_rope], dim=-1)
        cache.latent[:, start:end] = self.kv_a_layernorm(c_kv)
        cache.rope[:, start:end] = self.rotary(k_pe, positions)
        latent = cache.latent[:, :end].unsqueeze(1)  # (b, 1, end, rank): shared by every head
        k_rope = cache.rope[:, :end].unsqueeze(1)
        kv_weight = cache.kv_weight
        # query i (position start + i) sees keys 0 .. start + i; one new token sees everything
        mask = None
        if s > 1:
            mask = torch.arange(end, device=x.device) <= positions[:, None]

        if kv_weight is None:
            kv = self.kv_b_proj(latent.squeeze(1)).view(b, end, heads, self.d_nope + self.d_v).transpose(1, 2)
            k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)
            key = torch.cat([k_nope, k_rope.expand(b, heads, end, self.d_rope)], dim=-1)
            out = F.scaled_dot_product_attention(
                torch.cat([q_nope, q_pe], -1), key, v, attn_mask=mask, scale=self.scale
            )
        else:
            w_uk, w_uv = kv_weight.split([self.d_nope, self.d_v], dim=-1)
            q_latent = torch.einsum("bhsd,rhd->bhsr", q_nope, w_uk)
            key = torch.cat([latent, k_rope], dim=-1).expand(b, heads, end, -1)
            out_latent = F.scaled_dot_product_attention(
                torch.cat([q_latent, q_pe], -1),
                key,
                latent.expand(b, heads, end, -1),
                attn_mask=mask,
                scale=self.scale,
            )
            out = torch.einsum("bhsr,rhd->bhsd", out_latent, w_uv)
        out = out.transpose(1, 2).reshape(b, s, heads * self.d_v)
        return self.o_proj(out)
