"""Multi-head Latent Attention transformer (DeepSeek-V2/V3 style), tensor-parallel aware."""

from models.config import MLAConfig
from models.mla import MultiHeadLatentAttention, RMSNorm, RotaryEmbedding
from models.transformer import MLATransformer

__all__ = ["MLAConfig", "MLATransformer", "MultiHeadLatentAttention", "RMSNorm", "RotaryEmbedding"]
