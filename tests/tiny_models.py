"""The tiny MLA model several equivalence tests share (2 layers, 4 heads, every latent dimension small)."""

from models import MLAConfig

TINY_MLA = MLAConfig(
    vocab_size=97,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    intermediate_size=64,
    max_seq_len=16,
)
