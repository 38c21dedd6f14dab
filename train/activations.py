"""Activation memory of one pipeline rank: what the forward keeps for the backward, the backward's
working set, and the logits and loss of the last stage (train/memory.py adds the model state).

Activations, per micro-batch, per token of the full sequence, for a decoder layer (e the activation
bytes, T = tp, S = T under sequence parallelism else 1, h hidden, H heads, I the MLP width, norms
(4 + 2e) d bytes: their fp32 input, normalised value and output):

    norms and residual  2 ((4 + 2e) h + 4) / S      [SP: + 2 e h for the two gathered inputs, kept whole]
    latents             (4 + 2e) q_lora + 4 + e (kv_lora + d_rope) + (4 [e = 2] + 2e) kv_lora + 4
    heads (all / T)     e H (d_qk + d_nope + d_v + d_v)     q, [k_nope, v], and o_proj's input
    attention core / T  e H (2 d_qk + d_v) + 4 H            query, key, output and log-sum-exp
                        (torch's CPU "math" fallback: about 4 H (2 d_qk + d_v + s)); not kept at all
                        under selective recompute
    MLP / T             4 e I                               gate, up, silu(gate), their product

times the micro-batches in flight on the rank (1 without a pipeline; the schedule's peak from
`parallel.pipeline.schedules.simulate` with one) times its layers. Full recompute keeps e h / S per
layer instead, and recomputes one layer at a time. One layer's worth (two with full recompute: the
recomputed one) is added for the backward working set (gradients of the activations being consumed).
The last stage adds the loss: logits of e V / T, their fp32 softmax (4 V / T) kept for backward per
micro-batch in flight, and about 12 V / T transient bytes while it is computed.

Context parallelism (cp = C > 1): every per-token figure applies to the s / C tokens a rank holds. The
attention (parallel/context/) keeps no per-head keys and values: per local token it keeps the RoPE'd
query, the output (and o_proj's copy of it) and its log-sum-exp, e H (d_qk + 2 d_v) / T + 4 H / T, plus
its own latents passed round the ring, e (kv_lora + d_rope) per local token (the all-gather
alternative would keep the whole sequence's, C times more), but not the
normalised latent as an up-projection's input (- e kv_lora) nor, in 16 bits, W_kva's output (- e
(kv_lora + d_rope)); nothing more to drop under selective recompute. Per layer (not per token) it keeps
W_kvb as read through the layer with the identity it was read with, e kv_lora (H (d_nope + d_v) / T +
kv_lora) bytes. Its backward working set adds, per micro-batch row, one (query piece, key
piece) pair's fp32 scores, probabilities and their gradients, 3 x 4 (H / T) (s / 2C)^2, one key
piece's up-projected keys and values with their gradients, and the ring's blocks in hand and in flight
with their fp32 gradient accumulators, (2 e + 8) (kv_lora + d_rope) per local token.
"""

from __future__ import annotations

from functools import lru_cache

from models.config import MLAConfig
from parallel.pipeline.schedules import build_schedule, simulate
from train.config import Config
from train.layout import batch_split, rank_stages


@lru_cache(maxsize=256)
def _peak_in_flight(schedule: str, p: int, m: int, v: int) -> tuple[int, ...]:
    if p == 1 and v == 1:
        return (1,)
    return tuple(simulate(build_schedule(schedule, p, m, v), v).peak_in_flight)


def layer_activation_bytes(mcfg: MLAConfig, config: Config, attention: str = "efficient") -> dict[str, float]:
    """Bytes kept for backward per token of a micro-batch (full sequence), per decoder layer, by part."""
    c, dc = mcfg, config.distributed
    e = 2 if config.train.precision in ("bf16", "fp16") else 4
    T = dc.tp or 1
    S = T if dc.sequence_parallel and T > 1 else 1
    h, H, s = c.hidden_size, c.num_heads, config.data.seq_len
    norm = (4 + 2 * e) * h + 4
    residual = 2 * norm / S + (2 * e * h - 2 * e * h / S if S > 1 else 0)
    latents = e * (c.kv_lora_rank + c.qk_rope_head_dim) + (4 * (e == 2) + 2 * e) * c.kv_lora_rank + 4
    if c.q_lora_rank is not None:
        latents += (4 + 2 * e) * c.q_lora_rank + 4
    heads = e * H * (c.qk_head_dim + c.qk_nope_head_dim + 2 * c.v_head_dim) / T
    if attention == "math":  # torch's CPU fallback: fp32 scaled query, key, probabilities and values
        core = (4 * H * (2 * c.qk_head_dim + c.v_head_dim + s) + (H * s if c.dropout > 0 else 0)) / T
    else:
        core = (e * H * (2 * c.qk_head_dim + c.v_head_dim) + 4 * H) / T
    if dc.cp > 1:  # parallel/context/attention.py: no per-head K/V kept; the gathered latents are
        heads = e * H * (c.qk_head_dim + 2 * c.v_head_dim) / T + 4 * H / T
        latent = c.kv_lora_rank + c.qk_rope_head_dim
        latents += e * latent - e * c.kv_lora_rank - (e * latent if e == 2 else 0)
        core = 0.0
    mlp = 4 * e * c.intermediate_size / T
    if c.is_moe:  # the larger of a dense and an MoE layer's (every layer is counted alike)
        width = c.moe_intermediate_size * (c.num_experts_per_tok + (c.n_shared_experts or 0))
        routed = 2 * e * h * c.num_experts_per_tok + 4 * 2 * c.n_routed_experts  # gathered x, outputs; scores
        mlp = max(mlp, 4 * e * width / T + routed)
    dropout = 2 * h / S if c.dropout > 0 else 0
    return {
        "residual": residual,
        "latents": latents,
        "heads": heads,
        "core": core,
        "mlp": mlp,
        "dropout": dropout,
    }


def _context_pair_bytes(mcfg: MLAConfig, config: Config) -> float:
    """Transient bytes per row of one (query piece, key piece) pair of the context-parallel attention's
    backward: fp32 scores, probabilities and their gradients, a key piece's K, V and their gradients, and
    the ring's latent blocks (in hand, in flight) with their fp32 gradient accumulators."""
    dc, c = config.distributed, mcfg
    e = 2 if config.train.precision in ("bf16", "fp16") else 4
    heads = c.num_heads / (dc.tp or 1)
    piece = config.data.seq_len / (2 * dc.cp)
    ring = (2 * e + 8) * (c.kv_lora_rank + c.qk_rope_head_dim) * 2 * piece
    return 3 * 4 * heads * piece**2 + (e + 4) * heads * piece * (c.qk_head_dim + c.v_head_dim) + ring


def context_weight_bytes(mcfg: MLAConfig, config: Config) -> float:
    """Per layer under cp > 1: W_kvb read through `kv_b_proj(I)` and the identity, kept for backward."""
    c, e = mcfg, 2 if config.train.precision in ("bf16", "fp16") else 4
    heads = c.num_heads / (config.distributed.tp or 1)
    return e * c.kv_lora_rank * (heads * (c.qk_nope_head_dim + c.v_head_dim) + c.kv_lora_rank)


def activation_bytes(
    config: Config, mcfg: MLAConfig, pp_rank: int, attention: str = "efficient"
) -> dict[str, int]:
    """Peak activation bytes of pipeline rank `pp_rank` of `config` (dp, tp, pp set), by part."""
    dc, tc = config.distributed, config.train
    tp = dc.tp or 1
    chunks = list(rank_stages(config, mcfg, pp_rank).values())
    layers = sum(s.layer_end - s.layer_start for s in chunks)
    mbs, m = batch_split(config, dc.dp or 1)
    out: dict[str, int] = {}
    tokens = mbs * config.data.seq_len // dc.cp  # this rank's share of each sequence
    parts = layer_activation_bytes(mcfg, config, attention)
    per_layer = sum(parts.values())
    e = 2 if tc.precision in ("bf16", "fp16") else 4
    S = tp if dc.sequence_parallel and tp > 1 else 1
    mode = dc.recompute
    kept = {"none": per_layer, "selective": per_layer - parts["core"], "full": e * mcfg.hidden_size / S}[mode]
    in_flight = _peak_in_flight(dc.pp_schedule, dc.pp, m, dc.virtual_stages)[pp_rank]
    out["activations"] = int(in_flight * layers / len(chunks) * kept * tokens)
    if dc.cp > 1 and mode != "full":
        out["activations"] += int(in_flight * layers / len(chunks) * context_weight_bytes(mcfg, config))
    out["backward working set"] = int(per_layer * tokens * (2 if mode == "full" else 1))
    if dc.cp > 1:
        out["backward working set"] += int(mbs * _context_pair_bytes(mcfg, config))
    if any(s.is_last for s in chunks):  # softmax kept per micro-batch in flight; logits, fp32 copies
        vocab = -(-mcfg.vocab_size // tp)
        final_norm = ((4 + 2 * e) * mcfg.hidden_size + 4) / S + (e * mcfg.hidden_size if S > 1 else 0)
        per_token = vocab * (4 * (in_flight - 1) + e + 8 + 4 * (e == 2)) + in_flight * final_norm
        out["logits and loss"] = int(tokens * per_token)
    return out
