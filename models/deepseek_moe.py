"""Mixture-of-experts keys of a DeepSeek `config.json` <-> `MLAConfig`, and the expert weights.

Weights need no renaming: our MoE modules carry the published names (`mlp.gate.weight`,
`mlp.gate.e_score_correction_bias`, `mlp.experts.{j}.{gate,up,down}_proj.weight`,
`mlp.shared_experts.*`), which transformers 5's `save_pretrained` also writes (it fuses the experts only
in memory). V3's correction bias, a buffer in transformers, is a frozen parameter here, so it is read
and written like every weight.

Config keys: transformers' classes fix the routing by model type (DeepSeek-V2: softmax scores, greedy or
group_limited_greedy, no normalisation of the top-k weights; V3: sigmoid scores, noaux_tc, with the
correction bias) and do not keep `scoring_func`; a DeepSeek release config may state it, and is read as
stated. Missing keys take transformers' defaults of the model type. `aux_loss_alpha` is a training choice
(`model.aux_loss_alpha`), not read from the folder: transformers' loss has no auxiliary term.
Export writes `deepseek_v2` for softmax routing without top-k normalisation and `deepseek_v3` for
sigmoid + noaux_tc, the two routings transformers implements; other MoE routings cannot be exported.
"""

from __future__ import annotations

from typing import Any

from models.config import MLAConfig

# transformers' defaults per model type for the keys a config.json may leave out.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": {
        "scoring_func": "softmax",
        "topk_method": "greedy",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "n_shared_experts": 2,
        "first_k_dense_replace": 0,
        "moe_intermediate_size": 1407,
        "num_experts_per_tok": None,
        "n_group": None,
        "topk_group": None,
        "moe_layer_freq": 1,
    },
    "deepseek_v3": {
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "n_shared_experts": 1,
        "first_k_dense_replace": 3,
        "moe_intermediate_size": 2048,
        "num_experts_per_tok": 8,
        "n_group": 8,
        "topk_group": 4,
        "moe_layer_freq": 1,
    },
}


def moe_config_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """The MoE fields of `MLAConfig` for a DeepSeek config.json ({} for a dense model, also when
    `first_k_dense_replace` makes every layer dense)."""
    if not hf.get("n_routed_experts"):
        return {}
    defaults = HF_DEFAULTS[hf["model_type"]]
    first_dense = (
        defaults["first_k_dense_replace"]
        if hf.get("first_k_dense_replace") is None
        else hf["first_k_dense_replace"]
    )
    if int(first_dense) >= int(hf["num_hidden_layers"]):
        return {}
    fields: dict[str, Any] = {"n_routed_experts": int(hf["n_routed_experts"])}
    for key, default in defaults.items():
        fields[key] = default if hf.get(key) is None else hf[key]
    if hf["model_type"] == "deepseek_v2" and fields["norm_topk_prob"]:
        raise ValueError(
            f"{where}: norm_topk_prob=true with model_type='deepseek_v2': transformers' DeepSeek-V2 ignores "
            f"it and DeepSeek's own code honours it; set it to false (what transformers computes) to load"
        )
    fields["routed_scaling_factor"] = float(fields["routed_scaling_factor"])
    fields["norm_topk_prob"] = bool(fields["norm_topk_prob"])
    return fields


def moe_config_to_hf(config: MLAConfig) -> dict[str, Any]:
    """The config.json keys (model type included) transformers needs to build this model's MoE layers."""
    if not config.is_moe:
        return {}
    if config.scoring_func == "softmax" and config.topk_method != "noaux_tc" and not config.norm_topk_prob:
        model_type, cls = "deepseek_v2", "DeepseekV2ForCausalLM"
    elif config.scoring_func == "sigmoid" and config.topk_method == "noaux_tc":
        model_type, cls = "deepseek_v3", "DeepseekV3ForCausalLM"
    else:
        raise ValueError(
            f"model.scoring_func={config.scoring_func!r}, topk_method={config.topk_method!r}, norm_topk_prob="
            f"{config.norm_topk_prob}: transformers implements only softmax routing without normalisation "
            f"(DeepSeek-V2) or sigmoid + noaux_tc (V3); this model cannot be exported"
        )
    if config.moe_layer_freq != 1:
        raise ValueError(f"model.moe_layer_freq={config.moe_layer_freq}: transformers supports only 1")
    hf: dict[str, Any] = {"architectures": [cls], "model_type": model_type}
    for key in HF_DEFAULTS[model_type]:
        hf[key] = getattr(config, key)
    hf["n_routed_experts"] = config.n_routed_experts
    hf["n_shared_experts"] = config.n_shared_experts or 0
    hf["n_group"] = config.n_group or 1
    hf["topk_group"] = config.topk_group or 1
    return hf
