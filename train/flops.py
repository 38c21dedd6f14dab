"""Model FLOPs per token and model FLOPs utilisation (MFU).

Training FLOPs per token (forward + backward = 3 x forward, PaLM's convention, no recompute counted):

    6 N_matmul                              every weight that multiplies an activation once per token:
                                            all linear layers and the LM head (the embedding lookup is
                                            not a matmul; a tied head counts once, as the head)
  + 6 L H T (d_qk + d_v)                    attention scores QK^T (d_qk = d_nope + d_rope per head) and
                                            the weighted sum AV (d_v per head), T = sequence length,
                                            counted over all T keys as PaLM and Megatron do

Mixture of experts: only the active parameters count, i.e. per MoE layer the router, the shared experts
and `num_experts_per_tok` routed experts (`MLAConfig.mlp_parameters(i, active_only=True)`), not all of them.

MFU = (tokens/s x FLOPs per token) / (number of devices x peak FLOP/s of one device).
"""

from __future__ import annotations

from models.config import MLAConfig


def matmul_parameters(config: MLAConfig) -> int:
    """Parameters that take part in a matmul per token: everything but norms and the embedding lookup
    (MoE layers: the router, the shared experts and the chosen routed experts only)."""
    h, H = config.hidden_size, config.num_heads
    if config.q_lora_rank is None:
        q = h * H * config.qk_head_dim
    else:
        q = h * config.q_lora_rank + config.q_lora_rank * H * config.qk_head_dim
    kv = h * (config.kv_lora_rank + config.qk_rope_head_dim) + config.kv_lora_rank * H * (
        config.qk_nope_head_dim + config.v_head_dim
    )
    o = H * config.v_head_dim * h
    mlps = sum(config.mlp_parameters(i, active_only=True) for i in range(config.num_layers))
    head = config.vocab_size * h
    return config.num_layers * (q + kv + o) + mlps + head


def attention_flops_per_token(config: MLAConfig, seq_len: int) -> int:
    """Training FLOPs of the attention scores and weighted sum, per token."""
    return 6 * config.num_layers * config.num_heads * seq_len * (config.qk_head_dim + config.v_head_dim)


def flops_per_token(config: MLAConfig, seq_len: int) -> int:
    """Training (forward + backward) model FLOPs per token."""
    return 6 * matmul_parameters(config) + attention_flops_per_token(config, seq_len)


def mfu(tokens_per_s: float, config: MLAConfig, seq_len: int, devices: int, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of `devices` devices."""
    return tokens_per_s * flops_per_token(config, seq_len) / (devices * peak_flops)
