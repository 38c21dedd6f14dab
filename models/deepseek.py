"""DeepSeek-V2/V3 checkpoints in the Hugging Face layout: config.json <-> MLAConfig, safetensors <-> weights.

Our modules carry the Hugging Face names (`model.layers.{i}.self_attn.q_b_proj.weight`, ...), so weights
need no renaming. The config (4.x and 5.x keys, YaRN scales) is converted in `models.deepseek_config`;
its `read_config`, `config_from_hf` and `config_to_hf` are also importable from here. The weights need
care in one place:

- **RoPE pair layout.** We rotate adjacent pairs (2i, 2i+1) of the rope dimensions, DeepSeek's released
  layout: transformers' DeepSeek-V2 (complex multiplication) and V3 with `rope_interleave: true` (the
  default) do the same, up to a permutation applied to queries and keys alike, which leaves q.k
  unchanged. With `rope_interleave: false`, V3 rotates halves (i, i + d/2) instead; the rope rows of
  `q_b_proj`/`q_proj` (per head) and `kv_a_proj_with_mqa` are then permuted at load, our row 2i <- row i,
  2i+1 <- row i + d/2. We always save the interleaved layout (and say so in config.json).

Loading under tensor parallelism reads only this rank's rows or columns of each sharded tensor
(`safe_open(...).get_slice`), zero-padded like `shard_tensor`. Mixture-of-experts weights carry their
published names (`models.deepseek_moe`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from models.config import MLAConfig
from models.deepseek_config import config_from_hf, config_to_hf, read_config
from models.transformer import MLATransformer, StageSpec
from parallel.collectives import group_size
from parallel.lowbit.lora import LoRALinear
from parallel.pipeline import ModelParts
from parallel.tensor import gather_tensor, tp_dim
from parallel.topology import Topology

__all__ = [
    "checkpoint_dtype",
    "config_from_hf",
    "config_to_hf",
    "full_state",
    "load_pretrained",
    "read_config",
    "rope_rows_to_interleaved",
    "save_pretrained",
]

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
IGNORED_WEIGHT = re.compile(r".*rotary_emb\.inv_freq$")


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
    shapes are errors naming the tensor (the MTP layers past
    `num_hidden_layers` of DeepSeek-V3 releases are ignored, as transformers does).
    """
    path = Path(path)
    config, interleaved = config_from_hf(
        json.loads((path / "config.json").read_text()), str(path / "config.json")
    )
    reader = _CheckpointReader(path)
    names = reader.names()
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
    model: nn.Module | Sequence[nn.Module],
    pp_group: dist.ProcessGroup | None = None,
    ep_group: dist.ProcessGroup | None = None,
) -> dict[str, torch.Tensor]:
    """Every weight in full (TP-gathered; every routed expert when `ep_group` is given; all pipeline
    stages when `pp_group` is given), under Hugging Face names, on the CPU of every rank. `model` is a
    model or this rank's pipeline chunks.

    LoRA-wrapped linears contribute their merged weight W + (alpha/r) B A (decoded first when the base is
    NF4), so the result is the plain model that computes what this one computes. Collective over the TP
    (expert- and pipeline-parallel) group.
    """
    state: dict[str, torch.Tensor] = {}
    for chunk in ModelParts.of(model).chunks:
        state.update(_local_state(chunk))
    for group in (ep_group, pp_group):  # experts are global names: the ep ranks' sets are disjoint
        if group_size(group) > 1:
            parts: list[dict[str, torch.Tensor] | None] = [None] * group_size(group)
            dist.all_gather_object(parts, state, group=group)
            state = {name: t for part in parts for name, t in part.items()}
    return {name: state[name] for name in sorted(state)}


def checkpoint_dtype(path: str | Path) -> torch.dtype:
    """The dtype a Hugging Face folder stores its weights in (that of its first floating tensor)."""
    reader = _CheckpointReader(Path(path))
    for name in reader.names():
        dtype = SAFETENSORS_DTYPES.get(reader.slice(name).get_dtype())
        if dtype is not None:
            return dtype
    return torch.float32


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def save_pretrained(
    model: nn.Module | Sequence[nn.Module],
    path: str | Path,
    pp_group: dist.ProcessGroup | None = None,
    dtype: torch.dtype = torch.float32,
    token_ids: dict[str, int | None] | None = None,
    ep_group: dist.ProcessGroup | None = None,
) -> Path:
    """Write `config.json`, `generation_config.json` and `model.safetensors` (full tensors in `dtype`)
    that transformers loads.

    `model` is a model or this rank's pipeline chunks (with their `pp_group`). `token_ids` may give
    `bos_token_id`, `eos_token_id`, `pad_token_id` for both configs. Collective: every rank calls;
    shards are gathered and global rank 0 writes. A model with LoRA adapters is saved merged (see
    `full_state`); save the adapters alone with `parallel.lowbit.lora.save_adapter`.
    """
    path = Path(path)
    state = full_state(model, pp_group, ep_group)
    if not dist.is_initialized() or dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.to(dtype).contiguous() for name, t in state.items()}
        save_file(tensors, str(path / SINGLE_FILE), metadata={"format": "pt"})
        config = ModelParts.of(model).first.config
        ids = {k: v for k, v in (token_ids or {}).items() if k in SPECIAL_IDS and v is not None}
        hf = {**config_to_hf(config, str(dtype).removeprefix("torch.")), **ids}
        (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        generation = {"_from_model_config": True, **ids}
        (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if dist.is_initialized():
        dist.barrier()
    return path
