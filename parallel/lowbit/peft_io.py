"""LoRA adapters on disk in PEFT's layout, so that `peft` loads what we write and we load what it writes.

A directory holds

    adapter_model.safetensors   base_model.model.<module>.lora_A.weight (r x in) and .lora_B.weight
                                (out x r) for every adapted module, in full (TP-gathered, every stage)
    adapter_config.json         peft_type LORA, r, lora_alpha, lora_dropout, target_modules, ...

Saving gathers each rank's shards (and, given the pipeline and expert-parallel groups, every stage's
adapters and every routed expert's) and global rank 0 writes; loading reads the full tensors on every
rank and keeps each rank's shard, so a file loads under any (tp, pp) layout. PEFT features this LoRA
lacks are refused by name, never ignored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from parallel.collectives import group_rank, group_size
from parallel.lowbit.lora import LoraSettings, apply_lora, lora_modules
from parallel.lowbit.lora_targets import peft_target_modules
from parallel.pipeline import ModelParts
from parallel.tensor import full_tensor, shard_tensor, tp_dim

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
UNSUPPORTED_PEFT = {
    "use_rslora": False,
    "use_dora": False,
    "fan_in_fan_out": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "lora_bias": False,
    "modules_to_save": None,
}


def _is_writer() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def adapter_config(settings: LoraSettings, base_model: str | None = None) -> dict:
    """The `adapter_config.json` content (PEFT's LoraConfig fields) for adapters made with `settings` on
    the model at `base_model` (PEFT's `base_model_name_or_path`, which AutoPeftModel loads)."""
    targets = settings.targets
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "r": settings.r,
        "lora_alpha": int(settings.alpha) if float(settings.alpha).is_integer() else settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": peft_target_modules(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_adapter(
    model: nn.Module | Sequence[nn.Module] | Mapping[int, nn.Module],
    directory: str | Path,
    pp_group: dist.ProcessGroup | None = None,
    base_model: str | None = None,
    ep_group: dist.ProcessGroup | None = None,
) -> Path:
    """Write the adapters (full: TP-gathered, from every routed expert when `ep_group` is given, and from
    every pipeline stage when `pp_group` is given) in PEFT's layout; `base_model` is recorded as
    `base_model_name_or_path`. `model` is a model or this rank's pipeline chunks. Collective; global
    rank 0 writes."""
    parts = ModelParts.of(model)
    settings = getattr(parts.first, "lora_settings", None)
    if settings is None:
        raise ValueError("save_adapter: the model has no LoRA adapters (call apply_lora first)")
    tensors = {}
    for name, module in lora_modules(parts).items():
        for factor in ("lora_A", "lora_B"):
            weight = getattr(module, factor).weight
            tensors[f"{PEFT_PREFIX}{name}.{factor}.weight"] = (
                full_tensor(weight, module.group).cpu().contiguous()
            )
    for group in (ep_group, pp_group):  # experts keep global names: the ep ranks' sets are disjoint
        if group_size(group) > 1:
            gathered: list[dict | None] = [None] * group_size(group)
            dist.all_gather_object(gathered, tensors, group=group)
            tensors = {name: t for part in gathered for name, t in part.items()}
    directory = Path(directory)
    if _is_writer():
        directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (directory / ADAPTER_CONFIG).write_text(
            json.dumps(adapter_config(settings, base_model), indent=2) + "\n"
        )
    if dist.is_initialized():
        dist.barrier()
    return directory


def _read_config(directory: Path) -> dict:
    """`adapter_config.json`, refusing what this LoRA cannot reproduce."""
    where = directory / ADAPTER_CONFIG
    config = json.loads(where.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type={config.get('peft_type')!r}: expected 'LORA'")
    for key, plain in UNSUPPORTED_PEFT.items():
        if config.get(key) is not None and config[key] != plain:
            raise ValueError(f"{where}: {key}={config[key]!r} is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias={config['bias']!r} is not supported (only 'none')")
    return config


def load_adapter(
    model: nn.Module | Sequence[nn.Module] | Mapping[int, nn.Module], directory: str | Path
) -> list[str]:
    """Load PEFT-layout adapters into the model (each rank reads its shard); returns the module names.

    `model` is a model or this rank's pipeline chunks. A model without adapters gets them first
    (`apply_lora` with the file's r, lora_alpha, lora_dropout and target_modules, unquantized base); to
    load onto an NF4 base, call `apply_lora(..., quantize_base="nf4")` yourself first. Features of PEFT
    that this LoRA lacks (rsLoRA, DoRA, per-module ranks, trained biases, extra saved modules),
    mismatched r or alpha, and missing or unexpected tensors are errors.
    """
    directory = Path(directory)
    config = _read_config(directory)
    parts = ModelParts.of(model)
    modules = lora_modules(parts)
    if not modules:
        settings = (
            config["target_modules"],
            config["r"],
            config["lora_alpha"],
            config.get("lora_dropout", 0.0),
        )
        apply_lora(parts, *settings)
        modules = lora_modules(parts)
    for name, module in modules.items():
        if module.r != config["r"] or module.lora_alpha != config["lora_alpha"]:
            raise ValueError(
                f"{directory / ADAPTER_CONFIG}: r={config['r']}, lora_alpha={config['lora_alpha']} but "
                f"{name} has r={module.r}, alpha={module.lora_alpha}"
            )
    expected = {
        f"{PEFT_PREFIX}{name}.{factor}.weight": (getattr(m, factor).weight, m.group)
        for name, m in modules.items()
        for factor in ("lora_A", "lora_B")
    }
    with safe_open(str(directory / ADAPTER_WEIGHTS), framework="pt") as f:
        keys = {k.replace(".default.weight", ".weight"): k for k in f.keys()}  # noqa: SIM118
        missing = sorted(set(expected) - set(keys))
        extra = sorted(set(keys) - set(expected))
        if missing or extra:
            raise ValueError(f"{directory / ADAPTER_WEIGHTS}: missing tensors {missing}, unexpected {extra}")
        with torch.no_grad():
            for key, (param, group) in expected.items():
                _load_shard(param, f.get_tensor(keys[key]), key, group)
    return list(modules)


def _load_shard(param: torch.Tensor, full: torch.Tensor, key: str, group: dist.ProcessGroup | None) -> None:
    """Copy this rank's shard of the file's full tensor into `param`, after checking its full shape."""
    dim = tp_dim(param)
    want = list(param.shape)
    if dim is not None:
        want[dim] = param.tp_full_size
    if list(full.shape) != want:
        raise ValueError(f"{key}: shape {list(full.shape)} in the file, expected {want}")
    local = full if dim is None else shard_tensor(full, dim, group_rank(group), group_size(group))
    param.copy_(local.to(param.dtype))
