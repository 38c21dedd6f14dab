"""Model FLOPs per token: a hand count, and torch's own FLOP counter on a real forward + backward."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from models import MLAConfig, MLATransformer
from train.flops import flops_per_token, matmul_parameters, mfu

TINY = MLAConfig(
    vocab_size=10,
    hidden_size=4,
    num_layers=1,
    num_heads=2,
    q_lora_rank=None,
    kv_lora_rank=2,
    qk_nope_head_dim=2,
    qk_rope_head_dim=2,
    v_head_dim=2,
    intermediate_size=3,
    max_seq_len=8,
)


def test_hand_count_for_a_tiny_config():
    # q 4*2*4=32, kv_a 4*(2+2)=16, kv_b 2*2*(2+2)=16, o 2*2*4=16, mlp 3*4*3=36, head 10*4=40
    assert matmul_parameters(TINY) == 32 + 16 + 16 + 16 + 36 + 40
    # 6 N + 6 L H T (d_qk + d_v) = 6*156 + 6*1*2*5*(4+2)
    assert flops_per_token(TINY, 5) == 936 + 360
    assert mfu(1000.0, TINY, 5, 2, 1296.0 * 1000) == 0.5


def test_formula_matches_torch_flop_counter():
    config = MLAConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, q_lora_rank=16, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, intermediate_size=48, max_seq_len=16,
    )  # fmt: skip
    model = MLATransformer(config)
    ids = torch.randint(0, 64, (2, 16))
    counter = FlopCounterMode(display=False)
    with counter:
        model.loss(ids, ids).backward()
    counted = counter.get_total_flops() / ids.numel()
    # The counter sees every matmul and attention call of forward and backward: exact agreement.
    assert counted == flops_per_token(config, 16)


def test_moe_counts_only_the_active_experts_as_torch_flop_counter_sees_them():
    config = MLAConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, q_lora_rank=None, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, intermediate_size=48, max_seq_len=16,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
        first_k_dense_replace=1,
    )  # fmt: skip
    model = MLATransformer(config)
    ids = torch.randint(0, 64, (2, 16))
    counter = FlopCounterMode(display=False)
    with counter:
        model.loss(ids, ids).backward()
    # Dropless routing: each token meets exactly k routed experts (+ router and shared expert): exact.
    assert counter.get_total_flops() / ids.numel() == flops_per_token(config, 16)
    assert matmul_parameters(config) < config.num_parameters()  # 6 of 8 experts idle per token
