"""DeepSeek-V2/V3 `config.json` <-> `MLAConfig`, in transformers' 4.x and 5.x styles.

- **RoPE keys.** transformers 4.x writes `rope_theta` and `rope_scaling`; 5.x writes `rope_parameters`
  (`rope_type`, `rope_theta`, YaRN fields). Both are read, with transformers' precedence (`rope_scaling`
  over `rope_parameters`, a top-level `original_max_position_embeddings` over the one in the dict).
  `config_to_hf` writes both styles, `model_type: deepseek_v3`, `rope_interleave: true` and
  `first_k_dense_replace` = number of layers (all dense), which transformers' `DeepseekV3ForCausalLM` loads.
- **YaRN scales.** cos/sin are multiplied by transformers' attention factor: `attention_factor` if given,
  else mscale(f, mscale) / mscale(f, mscale_all_dim) when both are set, else mscale(f, 1), where
  mscale(f, m) = 0.1 m ln f + 1. Our RoPE uses mscale(f, mscale) / mscale(f, mscale_all_dim) with
  defaults 1 and 0 (DeepSeek's own code), so `mscale` is chosen at load to give transformers' factor.
  The softmax scale is (d_nope + d_rope)^-0.5 * mscale(f, mscale_all_dim)^2 in both.
- **Mixture of experts**: the MoE keys are read and written by `models.deepseek_moe`.
- **Rejected**, with an error naming the file and key: another model type, biases, grouped KV heads, an
  activation other than SiLU, a RoPE type other than default or YaRN.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from models.config import MLAConfig
from models.deepseek_moe import moe_config_from_hf, moe_config_to_hf
from models.mla import yarn_mscale

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")

# config.json key -> MLAConfig field, for the keys every checkpoint must state.
REQUIRED = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "q_lora_rank": "q_lora_rank",
    "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
    "intermediate_size": "intermediate_size",
}
# config.json key -> (MLAConfig field, transformers' default when the key is absent).
OPTIONAL = {
    "max_position_embeddings": ("max_seq_len", 4096),
    "rms_norm_eps": ("rms_norm_eps", 1e-6),
    "tie_word_embeddings": ("tie_embeddings", False),
    "initializer_range": ("init_std", 0.02),
    "attention_dropout": ("dropout", 0.0),
}


def _rope_from_hf(hf: dict[str, Any], where: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, our YaRN dict or None) giving the same cos/sin and softmax scale as transformers."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor") or 1.0)) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor != 1 is not supported")
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise ValueError(f"{where}: rope type {kind!r} is not supported (expected 'default' or 'yarn')")
    if params.get("truncate", True) is not True:
        raise ValueError(f"{where}: YaRN with truncate=false is not supported")
    max_positions = int(hf.get("max_position_embeddings", OPTIONAL["max_position_embeddings"][1]))
    original = int(
        hf.get("original_max_position_embeddings")
        or params.get("original_max_position_embeddings")
        or max_positions
    )
    factor = float(params.get("factor") or max_positions / original)
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if params.get("attention_factor") is not None:
        target = float(params["attention_factor"])
    elif mscale and mscale_all_dim:
        target = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
        target = yarn_mscale(factor, 1.0)
    denominator = yarn_mscale(factor, float(mscale_all_dim or 0.0))
    if factor <= 1:
        if abs(target - 1.0) > 1e-12:
            raise ValueError(f"{where}: YaRN attention_factor={target} with factor <= 1 is not supported")
        ours = float(mscale or 1.0)
    elif params.get("attention_factor") is None and mscale and mscale_all_dim:
        ours = float(mscale)
    elif params.get("attention_factor") is None and not mscale_all_dim:
        ours = 1.0  # transformers: mscale(f, 1); ours: mscale(f, 1) / mscale(f, 0)
    else:  # solve mscale(factor, ours) / denominator = target
        ours = (target * denominator - 1.0) / (0.1 * math.log(factor))
    scaling = {
        "type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": original,
        "beta_fast": float(params.get("beta_fast") or 32),
        "beta_slow": float(params.get("beta_slow") or 1),
        "mscale": ours,
        "mscale_all_dim": float(mscale_all_dim or 0.0),
    }
    return theta, scaling


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> tuple[MLAConfig, bool]:
    """The `MLAConfig` of a DeepSeek-V2/V3 `config.json`, and whether its rope rows are interleaved.

    Errors name the file and the key: another model type, biases, grouped KV heads, an
    activation other than SiLU, a RoPE type other than default or YaRN.
    """
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{where}: model_type={model_type!r}: expected one of {list(MODEL_TYPES)}")
    missing = [key for key in REQUIRED if key not in hf]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act={hf['hidden_act']!r}: only 'silu' is supported")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"{where}: {key}=true: biases are not supported")
    kv_heads = hf.get("num_key_value_heads")
    if kv_heads is not None and kv_heads != hf["num_attention_heads"]:
        raise ValueError(
            f"{where}: num_key_value_heads={kv_heads} differs from num_attention_heads="
            f"{hf['num_attention_heads']} (MLA has one latent per head)"
        )
    fields: dict[str, Any] = {ours: hf[key] for key, ours in REQUIRED.items()}
    for key, (ours, default) in OPTIONAL.items():
        fields[ours] = default if hf.get(key) is None else hf[key]
    fields["dropout"] = float(fields["dropout"])
    fields["rope_theta"], fields["rope_scaling"] = _rope_from_hf(hf, where)
    fields.update(moe_config_from_hf(hf, where))
    if float(fields["rms_norm_eps"]) != 1e-6:
        warnings.warn(
            f"{where}: rms_norm_eps={fields['rms_norm_eps']}: transformers' DeepSeek normalises the query "
            f"and key/value latents with eps=1e-6 whatever this value; our model uses it for every norm, "
            f"so logits will differ slightly",
            stacklevel=2,
        )
    interleaved = model_type == "deepseek_v2" or bool(hf.get("rope_interleave", True))
    return MLAConfig(**fields), interleaved


def read_config(path: str | Path) -> MLAConfig:
    """The `MLAConfig` of a DeepSeek-format folder (its `config.json`)."""
    file = Path(path) / "config.json"
    return config_from_hf(json.loads(file.read_text()), where=str(file))[0]


def config_to_hf(config: MLAConfig, dtype: str = "float32") -> dict[str, Any]:
    """A `config.json` for transformers' `DeepseekV3ForCausalLM` (4.x and 5.x keys), or
    `DeepseekV2ForCausalLM` for softmax-routed MoE (see `models.deepseek_moe`); `dtype` names the
    weights' dtype (`torch_dtype` in 4.x, `dtype` in 5.x)."""
    hf: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_heads,
        "q_lora_rank": config.q_lora_rank,
        "kv_lora_rank": config.kv_lora_rank,
        "qk_nope_head_dim": config.qk_nope_head_dim,
        "qk_rope_head_dim": config.qk_rope_head_dim,
        "v_head_dim": config.v_head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "attention_dropout": config.dropout,
        "attention_bias": False,
        "hidden_act": "silu",
        "first_k_dense_replace": config.num_layers,
        "num_nextn_predict_layers": 0,
        "rope_interleave": True,
        "torch_dtype": dtype,
        "dtype": dtype,
        "rope_theta": config.rope_theta,
    }
    hf.update(moe_config_to_hf(config))
    scaling = config.rope_scaling
    if scaling is None:
        hf["rope_scaling"] = None
        hf["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta}
        return hf
    factor = float(scaling["factor"])
    mscale, mscale_all_dim = float(scaling.get("mscale", 1.0)), float(scaling.get("mscale_all_dim", 0.0))
    yarn = {
        "factor": factor,
        "original_max_position_embeddings": int(scaling["original_max_position_embeddings"]),
        "beta_fast": float(scaling.get("beta_fast", 32)),
        "beta_slow": float(scaling.get("beta_slow", 1)),
        "mscale": mscale,
        "mscale_all_dim": mscale_all_dim,
    }
    ours = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    theirs = (
        yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        if mscale and mscale_all_dim
        else yarn_mscale(factor, 1.0)
    )
    if abs(ours - theirs) > 1e-12:
        yarn["attention_factor"] = ours
    hf["rope_scaling"] = {"type": "yarn", **yarn}
    hf["rope_parameters"] = {"rope_type": "yarn", "rope_theta": config.rope_theta, **yarn}
    return hf
