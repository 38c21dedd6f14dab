"""DeepSeek-V2/V3 checkpoints in the Hugging Face layout: config.json <-> MLAConfig, safetensors <-> weights.

Our modules carry the Hugging Face names (`model.layers.{i}.self_attn.q_b_proj.weight`, ...), so weights
need no renaming. Three things do need care:

- **config.json.** transformers 4.x writes `rope_theta` and `rope_scaling`; 5.x writes `rope_parameters`
  (`rope_type`, `rope_theta`, YaRN fields). Both are read, with transformers' precedence (`rope_scaling`
  over `rope_parameters`, a top-level `original_max_position_embeddings` over the one in the dict).
  `save_pretrained` writes both styles, `model_type: deepseek_v3` and `first_k_dense_replace` = number of
  layers (all dense), which transformers' own `DeepseekV3ForCausalLM` loads.
- **RoPE pair layout.** We rotate adjacent pairs (2i, 2i+1) of the rope dimensions, DeepSeek's released
  layout: transformers' DeepSeek-V2 (complex multiplication) and V3 with `rope_interleave: true` (the
  default) do the same, up to a permutation applied to queries and keys alike, which leaves q.k
  unchanged. With `rope_interleave: false`, V3 rotates halves (i, i + d/2) instead; the rope rows of
  `q_b_proj`/`q_proj` (per head) and `kv_a_proj_with_mqa` are then permuted at load, our row 2i <- row i,
  2i+1 <- row i + d/2. We always save the interleaved layout (and say so in config.json).
- **YaRN scales.** cos/sin are multiplied by transformers' attention factor: `attention_factor` if given,
  else mscale(f, mscale) / mscale(f, mscale_all_dim) when both are set, else mscale(f, 1), where
  mscale(f, m) = 0.1 m ln f + 1. Our RoPE uses mscale(f, mscale) / mscale(f, mscale_all_dim) with
  defaults 1 and 0 (DeepSeek's own code), so `mscale` is chosen at load to give transformers' factor.
  The softmax scale is (d_nope + d_rope)^-0.5 * mscale(f, mscale_all_dim)^2 in both.

Loading under tensor parallelism reads only this rank's rows or columns of each sharded tensor
(`safe_open(...).get_slice`), zero-padded like `shard_tensor`. Mixture-of-experts layers are rejected.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from models.config import MLAConfig
from models.transformer import MLATransformer, StageSpec
from parallel.collectives import group_size
from parallel.data import DataParallel
from parallel.lowbit.lora import LoRALinear
from parallel.tensor import gather_tensor, tp_dim
from parallel.topology import Topology

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"

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
# transformers' default `first_k_dense_replace` per model type, when config.json leaves it out.
FIRST_DENSE_DEFAULT = {"deepseek_v2": 0, "deepseek_v3": 3}
MOE_WEIGHT = re.compile(r"model\.layers\.(\d+)\.mlp\.(experts|gate|shared_experts)\.")
IGNORED_WEIGHT = re.compile(r".*rotary_emb\.inv_freq$")


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


# ----------------------------------------------------------------------------------------------- config


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


def _moe_layers(hf: dict[str, Any]) -> list[int]:
    """Indices of the layers DeepSeek makes mixture-of-experts (none when n_routed_experts is unset)."""
    if not hf.get("n_routed_experts"):
        return []
    first_dense = hf.get("first_k_dense_replace")
    if first_dense is None:
        first_dense = FIRST_DENSE_DEFAULT[hf["model_type"]]
    every = int(hf.get("moe_layer_freq") or 1)
    return [i for i in range(int(hf["num_hidden_layers"])) if i >= first_dense and i % every == 0]


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> tuple[MLAConfig, bool]:
    """The `MLAConfig` of a DeepSeek-V2/V3 `config.json`, and whether its rope rows are interleaved.

    Errors name the file and the key: another model type, MoE layers, biases, grouped KV heads, an
    activation other than SiLU, a RoPE type other than default or YaRN.
    """
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{where}: model_type={model_type!r}: expected one of {list(MODEL_TYPES)}")
    missing = [key for key in REQUIRED if key not in hf]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    moe = _moe_layers(hf)
    if moe:
        raise ValueError(
            f"{where}: layer {moe[0]} is a mixture-of-experts layer (n_routed_experts="
            f"{hf['n_routed_experts']}, first_k_dense_replace={hf.get('first_k_dense_replace')}); only dense "
            f"layers are supported (first_k_dense_replace >= num_hidden_layers={hf['num_hidden_layers']})"
        )
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


def config_to_hf(config: MLAConfig) -> dict[str, Any]:
    """A `config.json` for transformers' `DeepseekV3ForCausalLM` (4.x and 5.x keys), every layer dense."""
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
        "torch_dtype": "float32",
        "rope_theta": config.rope_theta,
    }
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


# ---------------------------------------------------------------------------------------------- weights


def rope_rows_to_interleaved(name: str, tensor: torch.Tensor, config: MLAConfig) -> torch.Tensor:
    """Permute the rope rows of a query or latent projection from the halves to the interleaved layout.

    `tensor` holds whole heads (a TP shard of `q_b_proj`/`q_proj` is whole heads). Other names are
    returned unchanged. Also right for gradients, which permute like their weights.
    """
    d = config.qk_rope_head_dim
    order = (
        torch.arange(d).view(2, d // 2).t().reshape(-1)
    )  # ours[2i] = theirs[i], ours[2i+1] = theirs[i+d/2]
    if name.endswith(("self_attn.q_b_proj.weight", "self_attn.q_proj.weight")):
        heads = tensor.reshape(-1, config.qk_head_dim, tensor.shape[-1])
        rope = heads[:, config.qk_nope_head_dim :][:, order]
        return torch.cat([heads[:, : config.qk_nope_head_dim], rope], dim=1).reshape(tensor.shape)
    if name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
        r = config.kv_lora_rank
        return torch.cat([tensor[:r], tensor[r:][order]], dim=0)
    return tensor


class _CheckpointReader:
    """Lazily opened safetensors files of a folder (single file or sharded with an index)."""

    def __init__(self, path: Path) -> None:
        if (path / INDEX_FILE).exists():
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
            self.file_of = {name: path / file for name, file in weight_map.items()}
        elif (path / SINGLE_FILE).exists():
            with safe_open(str(path / SINGLE_FILE), framework="pt") as f:
                self.file_of = {name: path / SINGLE_FILE for name in f.keys()}  # noqa: SIM118
        else:
            raise FileNotFoundError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
        self._open: dict[Path, Any] = {}

    def names(self) -> list[str]:
        return list(self.file_of)

    def slice(self, name: str):
        file = self.file_of[name]
        if file not in self._open:
            self._open[file] = safe_open(str(file), framework="pt")
        return self._open[file].get_slice(name)


def _read_local(reader: _CheckpointReader, name: str, param: torch.Tensor, rank: int) -> torch.Tensor:
    """This rank's piece of checkpoint tensor `name`, shaped like `param` (zero-padded as shard_tensor)."""
    source = reader.slice(name)
    shape = list(source.get_shape())
    dim = tp_dim(param)
    expected = list(param.shape)
    if dim is not None:
        expected[dim] = param.tp_full_size
    if shape != expected:
        raise ValueError(f"{name}: checkpoint shape {shape} does not match the model's {expected}")
    if dim is None:
        return source[:]
    per = param.shape[dim]
    start = min(rank * per, shape[dim])
    stop = min(start + per, shape[dim])
    local = param.new_zeros(param.shape)
    if stop > start:
        index = [slice(None)] * len(shape)
        index[dim] = slice(start, stop)
        local.narrow(dim, 0, stop - start).copy_(source[tuple(index)])
    return local


def load_pretrained(
    path: str | Path, topology: Topology | None = None, stage: StageSpec | None = None
) -> MLATransformer:
    """An `MLATransformer` with the weights of a Hugging Face DeepSeek-V2/V3 folder, in fp32 on the CPU.

    With `stage` (pipeline parallelism) only that stage's layers (and embedding / head) are built and
    read; under tensor parallelism each rank reads only its own slices of the sharded tensors. Weights
    may be stored in any floating dtype; they are converted to fp32. Missing or unexpected tensors, wrong
    shapes and mixture-of-experts weights are errors naming the tensor (the MTP layers past
    `num_hidden_layers` of DeepSeek-V3 releases are ignored, as transformers does).
    """
    path = Path(path)
    config, interleaved = config_from_hf(
        json.loads((path / "config.json").read_text()), str(path / "config.json")
    )
    reader = _CheckpointReader(path)
    names = reader.names()
    for name in names:
        match = MOE_WEIGHT.match(name)
        if match:
            raise ValueError(
                f"{path}: layer {match.group(1)} has mixture-of-experts weights ({name}); only dense layers "
                f"are supported"
            )
    with torch.device("meta"):  # every name of the whole model, without allocating it
        known = {name for name, _ in MLATransformer(config).named_parameters()}
    missing = sorted(known - set(names))
    if missing:
        raise ValueError(f"{path}: tensors missing from the checkpoint: {missing}")
    extra = [
        n for n in names if n not in known and not IGNORED_WEIGHT.match(n) and not _is_extra_layer(n, config)
    ]
    if extra:
        raise ValueError(f"{path}: unexpected tensors in the checkpoint: {extra}")
    model = MLATransformer(config, topology, stage)
    rank = topology.tp_rank if topology is not None else 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            local = _read_local(reader, name, param, rank)
            if not interleaved:
                local = rope_rows_to_interleaved(name, local, config)
            param.copy_(local.to(param.dtype))
    return model


def _is_extra_layer(name: str, config: MLAConfig) -> bool:
    """MTP layers past num_hidden_layers, or a tied model's saved copy of the head: ignored."""
    if config.tie_embeddings and name == "lm_head.weight":
        return True
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return match is not None and int(match.group(1)) >= config.num_layers


def _chunks(model: nn.Module | Sequence[nn.Module]) -> list[MLATransformer]:
    models = [model] if isinstance(model, nn.Module) else list(model)
    return [m.module if isinstance(m, DataParallel) else m for m in models]


def _local_state(model: MLATransformer) -> dict[str, torch.Tensor]:
    group = model.group
    adapted = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if any(name.startswith(prefix + ".") for prefix in adapted):
            continue
        dim = tp_dim(param)
        state[name] = (
            param.detach() if dim is None else gather_tensor(param.detach(), dim, param.tp_full_size, group)
        )
    for name, module in adapted.items():
        weight, dim = module.merged_weight(), module.weight_tp_dim
        state[f"{name}.weight"] = (
            weight if dim is None else gather_tensor(weight, dim, module.weight_full_size, group)
        )
        if module.bias is not None:
            bias, bias_dim = module.bias.detach(), tp_dim(module.bias)
            state[f"{name}.bias"] = (
                bias if bias_dim is None else gather_tensor(bias, bias_dim, module.bias.tp_full_size, group)
            )
    return {name: t.cpu().contiguous() for name, t in state.items()}


def full_state(
    model: nn.Module | Sequence[nn.Module], pp_group: dist.ProcessGroup | None = None
) -> dict[str, torch.Tensor]:
    """Every weight in full (TP-gathered; all pipeline stages when `pp_group` is given), under Hugging
    Face names, on the CPU of every rank. `model` is a model or this rank's pipeline chunks.

    LoRA-wrapped linears contribute their merged weight W + (alpha/r) B A (decoded first when the base is
    NF4), so the result is the plain model that computes what this one computes. Collective over the TP
    (and pipeline) group.
    """
    state: dict[str, torch.Tensor] = {}
    for chunk in _chunks(model):
        state.update(_local_state(chunk))
    if group_size(pp_group) > 1:
        parts: list[dict[str, torch.Tensor] | None] = [None] * group_size(pp_group)
        dist.all_gather_object(parts, state, group=pp_group)
        state = {name: t for part in parts for name, t in part.items()}
    return {name: state[name] for name in sorted(state)}


def save_pretrained(
    model: nn.Module | Sequence[nn.Module], path: str | Path, pp_group: dist.ProcessGroup | None = None
) -> Path:
    """Write `config.json` + `model.safetensors` (fp32, full tensors) that transformers loads.

    `model` is a model or this rank's pipeline chunks (with their `pp_group`). Collective: every rank
    calls; shards are gathered and global rank 0 writes. A model with LoRA adapters is saved merged (see
    `full_state`); save the adapters alone with `parallel.lowbit.lora.save_adapter`.
    """
    path = Path(path)
    state = full_state(model, pp_group)
    if not dist.is_initialized() or dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.float() for name, t in state.items()}
        save_file(tensors, str(path / SINGLE_FILE), metadata={"format": "pt"})
        config = _chunks(model)[0].config
        (path / "config.json").write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
    if dist.is_initialized():
        dist.barrier()
    return path
