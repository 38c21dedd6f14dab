"""MLAConfig: the shape of a DeepSeek-V2/V3 style Multi-head Latent Attention transformer.

Field names follow Hugging Face's DeepSeek config where they overlap, so a config can be filled from a
`config.json` without a translation table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
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
    """Hyper-parameters of an MLA transformer, dense or DeepSeekMoE.

    Per head, queries and keys have `qk_nope_head_dim + qk_rope_head_dim` dimensions: the "nope" part is
    decompressed from the latent, the "rope" part carries position (one RoPE key shared by all heads).
    Values have `v_head_dim` dimensions. `q_lora_rank=None` projects queries directly (DeepSeek-V2-Lite).

    Mixture of experts (Hugging Face's names; `n_routed_experts` None or 0 = every layer dense): layer i is
    an MoE layer when i >= `first_k_dense_replace` and i % `moe_layer_freq` == 0 (see `is_moe_layer`), with
    `n_routed_experts` experts of width `moe_intermediate_size`, `num_experts_per_tok` chosen per token,
    and `n_shared_experts` always-on experts fused into one MLP of width n_shared * moe_intermediate_size.
    Routing semantics are in `models.moe`.
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
    n_routed_experts: int | None = None
    num_experts_per_tok: int | None = None
    n_shared_experts: int | None = None
    moe_intermediate_size: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    aux_loss_alpha: float = 0.0
    router_bias_update_rate: float = 0.0

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
        if self.n_routed_experts is not None and (
            isinstance(self.n_routed_experts, bool)
            or not isinstance(self.n_routed_experts, int)
            or self.n_routed_experts < 0
        ):
            raise ValueError(
                f"model.n_routed_experts={self.n_routed_experts!r}: expected null or an integer >= 0"
            )
        if self.is_moe:
            self._check_moe()

    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts)

    def is_moe_layer(self, index: int) -> bool:
        """Whether decoder layer `index` is a mixture-of-experts layer (DeepSeek's rule)."""
        return self.is_moe and index >= self.first_k_dense_replace and index % self.moe_layer_freq == 0

    def _check_moe(self) -> None:
        n = self.n_routed_experts
        for name, low in (("num_experts_per_tok", 1), ("moe_intermediate_size", 1), ("moe_layer_freq", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(
                    f"model.{name}={value!r}: expected a positive integer with n_routed_experts={n}"
                )
        for name in ("n_shared_experts", "first_k_dense_replace"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"model.{name}={value!r}: expected an integer >= 0")
        if self.num_experts_per_tok > n:
            raise ValueError(
                f"model.num_experts_per_tok={self.num_experts_per_tok}: expected at most n_routed_experts={n}"
            )
        choices = {"scoring_func": SCORING_FUNCS, "topk_method": TOPK_METHODS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name}={getattr(self, name)!r}: expected one of {list(allowed)}")
        groups, chosen = self.n_group or 1, self.topk_group or 1
        if n % groups or not 1 <= chosen <= groups:
            raise ValueError(
                f"model.n_group={self.n_group!r}, model.topk_group={self.topk_group!r}: expected n_group "
                f"dividing n_routed_experts={n} and 1 <= topk_group <= n_group"
            )
        if chosen * (n // groups) < self.num_experts_per_tok:
            raise ValueError(
                f"model.topk_group={self.topk_group}: its {chosen} groups of {n // groups} experts hold "
                f"fewer than num_experts_per_tok={self.num_experts_per_tok}"
            )
        for name in ("routed_scaling_factor", "aux_loss_alpha", "router_bias_update_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"model.{name}={value!r}: expected a number >= 0")
        if self.router_bias_update_rate and self.topk_method != "noaux_tc":
            raise ValueError(
                f"model.router_bias_update_rate={self.router_bias_update_rate}: the correction bias is used "
                f"only by topk_method='noaux_tc' (got {self.topk_method!r})"
            )

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

    def num_parameters(self, active_only: bool = False) -> int:
        """Total parameter count (full model, unsharded, untied head counted once if tied); with
        `active_only`, the parameters one token uses (MoE: the chosen experts only)."""
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
        attention = q + kv + o + 2 * h
        mlps = sum(self.mlp_parameters(i, active_only) for i in range(self.num_layers))
        embed = self.vocab_size * h
        head = 0 if self.tie_embeddings else self.vocab_size * h
        return embed + self.num_layers * attention + mlps + h + head

    def mlp_parameters(self, index: int, active_only: bool = False) -> int:
        """Parameters of layer `index`'s MLP: dense, or router + shared + routed experts (only the
        `num_experts_per_tok` a token uses when `active_only`)."""
        h = self.hidden_size
        if not self.is_moe_layer(index):
            return 3 * h * self.intermediate_size
        routed = self.num_experts_per_tok if active_only else self.n_routed_experts
        width = self.moe_intermediate_size * (routed + (self.n_shared_experts or 0))
        return 3 * h * width + self.n_routed_experts * h
