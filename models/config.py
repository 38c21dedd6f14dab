"""MLAConfig: the shape of a DeepSeek-V2/V3 style Multi-head Latent Attention transformer.

Field names follow Hugging Face's DeepSeek config where they overlap, so a config can be filled from a
`config.json` without a translation table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

YARN_KEYS = {
    "type",
    "rope_type",
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
}


@dataclass
class MLAConfig:
    """Hyper-parameters of an MLA transformer (all-dense layers).

    Per head, queries and keys have `qk_nope_head_dim + qk_rope_head_dim` dimensions: the "nope" part is
    decompressed from the latent, the "rope" part carries position (one RoPE key shared by all heads).
    Values have `v_head_dim` dimensions. `q_lora_rank=None` projects queries directly (DeepSeek-V2-Lite).
    """

    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    q_lora_rank: int | None = None
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    intermediate_size: int = 688
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        positive = [
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "intermediate_size",
            "max_seq_len",
        ]
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name}={value!r}: expected a positive integer")
        if self.q_lora_rank is not None and (
            isinstance(self.q_lora_rank, bool)
            or not isinstance(self.q_lora_rank, int)
            or self.q_lora_rank <= 0
        ):
            raise ValueError(f"model.q_lora_rank={self.q_lora_rank!r}: expected a positive integer or null")
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"model.qk_rope_head_dim={self.qk_rope_head_dim}: expected an even number (RoPE pairs)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout!r}: expected a value in [0, 1)")
        for name in ("rope_theta", "rms_norm_eps", "init_std"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"model.{name}={getattr(self, name)!r}: expected a positive number")
        if self.rope_scaling is not None:
            self._check_rope_scaling()

    def _check_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        if not isinstance(scaling, dict):
            raise ValueError(f"model.rope_scaling={scaling!r}: expected null or a YaRN mapping")
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind != "yarn":
            raise ValueError(f"model.rope_scaling.type={kind!r}: only 'yarn' is supported")
        unknown = set(scaling) - YARN_KEYS
        if unknown:
            raise ValueError(
                f"model.rope_scaling: unknown keys {sorted(unknown)}; expected some of {sorted(YARN_KEYS)}"
            )
        for key in ("factor", "original_max_position_embeddings"):
            if key not in scaling:
                raise ValueError(f"model.rope_scaling.{key} is required for YaRN")
        if not float(scaling["factor"]) >= 1.0:
            raise ValueError(f"model.rope_scaling.factor={scaling['factor']!r}: expected a number >= 1")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def num_parameters(self) -> int:
        """Total parameter count (full model, unsharded, untied head counted once if tied)."""
        h, H = self.hidden_size, self.num_heads
        if self.q_lora_rank is None:
            q = h * H * self.qk_head_dim
        else:
            q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * self.qk_head_dim
        kv = (
            h * (self.kv_lora_rank + self.qk_rope_head_dim)
            + self.kv_lora_rank
            + self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)
        )
        o = H * self.v_head_dim * h
        mlp = 3 * h * self.intermediate_size
        per_layer = q + kv + o + mlp + 2 * h
        embed = self.vocab_size * h
        head = 0 if self.tie_embeddings else self.vocab_size * h
        return embed + self.num_layers * per_layer + h + head
