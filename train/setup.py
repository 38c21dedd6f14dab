"""Building a run from its config: the checks, the model config, the batch split, the model chunks,
the optimizer (plain or ZeRO) and the final weights. The loop that uses them is train/trainer.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.config import MLAConfig
from models.deepseek import full_state, load_pretrained, read_config
from models.transformer import MLATransformer, split_layers
from parallel.data import ZeroOptimizer
from parallel.data.zero3 import default_units
from parallel.lowbit.adamw8bit import AdamW8bit
from parallel.lowbit.lora import apply_lora
from parallel.topology import Topology
from train.config import Config, ConfigError
from train.context import RunContext
from train.data import Dataset
from train.runner import ModelRunner
from train.schedules import curriculum_at, learning_rate

NOT_YET: dict = {}  # "section.key": (is_set(config), "feature name") for options not landed yet


def check_supported(config: Config) -> None:
    """Reject, up front, the options whose features have not landed yet (see the README's matrix)."""
    for key, (is_set, feature) in NOT_YET.items():
        if is_set(config):
            section, name = key.split(".")
            value = config.model.get(name) if section == "model" else getattr(getattr(config, section), name)
            raise ConfigError(
                f"{key}={value!r}: {feature} is not supported yet (see the README's support matrix)"
            )
    dc = config.distributed
    if dc.zero_stage == 3 and dc.pp > 1 and dc.pp_schedule == "zb1p":
        raise ConfigError(
            "distributed.pp_schedule='zb1p' with distributed.zero_stage=3: zero-bubble defers weight "
            "gradients past the point where ZeRO-3 frees a layer's parameters; use 1f1b or zero_stage 2"
        )
    if dc.zero_stage == 3 and config.model.get("tie_embeddings"):
        raise ConfigError("model.tie_embeddings=true with distributed.zero_stage=3 is not supported")
    if dc.sequence_parallel and config.data.seq_len % (dc.tp or 1):
        raise ConfigError(
            f"data.seq_len={config.data.seq_len}: sequence parallelism splits the sequence over "
            f"distributed.tp={dc.tp} ranks, so it must be divisible by it"
        )


def model_config(config: Config, dataset: Dataset) -> MLAConfig:
    """MLAConfig defaults, the tokenizer's vocabulary size, then the user's `model` keys; or, with
    `model.pretrained`, the checkpoint's own config, which the user's keys must agree with."""
    fields = {k: v for k, v in config.model.items() if k != "pretrained"}
    pretrained = config.model.get("pretrained")
    if pretrained is None:
        fields.setdefault("vocab_size", dataset.vocab_size)
        mcfg = MLAConfig(**fields)
    else:
        try:
            mcfg = read_config(pretrained)
        except (OSError, ValueError) as error:
            raise ConfigError(f"model.pretrained={pretrained!r}: {error}") from None
        for key, value in fields.items():
            if getattr(mcfg, key) != value:
                theirs = getattr(mcfg, key)
                raise ConfigError(
                    f"model.{key}={value!r}: the pretrained model {pretrained} has {key}={theirs!r}"
                )
    if dataset.max_token_id >= mcfg.vocab_size:
        raise ConfigError(
            f"model.vocab_size={mcfg.vocab_size}: the data contains token id {dataset.max_token_id}, at or "
            f"above the vocabulary size (the tokenizer has {dataset.vocab_size} tokens)"
        )
    if config.data.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"data.seq_len={config.data.seq_len}: exceeds model.max_seq_len={mcfg.max_seq_len}")
    return mcfg


def lr_at(step: int, config: Config) -> float:
    """Linear warmup to `optim.lr`, then `optim.schedule` (constant, linear, cosine, wsd; see
    train/schedules.py) down to `optim.min_lr`."""
    opt = config.optim
    return learning_rate(
        step,
        schedule=opt.schedule,
        lr=opt.lr,
        min_lr=opt.min_lr,
        warmup_steps=opt.warmup_steps,
        total_steps=config.train.steps,
        decay_fraction=opt.decay_fraction,
    )


def batch_shape_at(step: int, config: Config) -> tuple[int, int]:
    """(sequence length, sequences) of the global batch at `step`, under `train.curriculum_*`."""
    tc = config.train
    return curriculum_at(
        step,
        start_seq_len=tc.curriculum_start_seq_len,
        steps=tc.curriculum_steps,
        seq_len=config.data.seq_len,
        global_batch_size=tc.global_batch_size,
        constant_tokens=tc.curriculum_constant_tokens,
    )


def uses_zero(config: Config) -> bool:
    """ZeroOptimizer owns the gradients when sharding, offloading, or keeping fp32 master weights for a
    16-bit model (stage 0)."""
    dc = config.distributed
    return dc.zero_stage > 0 or dc.offload_optimizer or config.train.precision in ("bf16", "fp16")


def build_optimizer(
    chunks: dict[int, MLATransformer], config: Config, topology: Topology
) -> torch.optim.Optimizer:
    """AdamW (`optim.name: adamw`) or 8-bit AdamW (`adamw8bit`), weight decay on matrices only (not on
    norms and biases); wrapped in a ZeroOptimizer over the dp group when `uses_zero(config)`."""
    params = [p for chunk in chunks.values() for p in chunk.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.optim.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    hyper = dict(lr=config.optim.lr, betas=tuple(config.optim.betas), eps=config.optim.eps)
    if config.optim.name == "adamw8bit":
        inner_cls = AdamW8bit
    else:
        inner_cls = torch.optim.AdamW
        fused = topology.device.type == "cuda" and not config.distributed.offload_optimizer
        hyper.update({"fused": True} if fused else {"foreach": True})
    if uses_zero(config):
        dc = config.distributed
        units = [u for chunk in chunks.values() for u in default_units(chunk)] if dc.zero_stage == 3 else None
        return ZeroOptimizer(
            groups,
            inner_cls,
            dc.zero_stage,
            topology.dp_group,
            dc.offload_optimizer,
            dc.bucket_cap_mb,
            units,
            **hyper,
        )
    return inner_cls(groups, **hyper)


def batch_split(config: Config, dp: int) -> tuple[int, int]:
    """(micro_batch_size, micro-batches per step) of one dp rank, from `train.micro_batch_size` or
    `distributed.num_microbatches` (at most one needed; they must agree when both are set)."""
    gbs, mbs, m = (
        config.train.global_batch_size,
        config.train.micro_batch_size,
        config.distributed.num_microbatches,
    )
    if gbs % dp:
        raise ConfigError(f"train.global_batch_size={gbs}: not divisible by dp={dp}")
    per_rank = gbs // dp
    if m is not None:
        if per_rank % m:
            raise ConfigError(
                f"distributed.num_microbatches={m}: does not divide the per-rank batch "
                f"global_batch_size/dp = {per_rank}"
            )
        if mbs is not None and mbs * m != per_rank:
            raise ConfigError(
                f"train.micro_batch_size={mbs} x distributed.num_microbatches={m} != global_batch_size/dp = "
                f"{per_rank}"
            )
        return per_rank // m, m
    mbs = mbs or per_rank
    if per_rank % mbs:
        raise ConfigError(
            f"train.micro_batch_size={mbs}: must divide the per-rank batch global_batch_size/dp = {per_rank}"
        )
    return mbs, per_rank // mbs


def build_model(config: Config, mcfg: MLAConfig, topology: Topology) -> dict[int, MLATransformer]:
    """This rank's model chunks, keyed by (virtual) pipeline stage: {0: whole model} without pipeline."""
    v = config.distributed.virtual_stages
    specs = split_layers(mcfg.num_layers, topology.pp_size * v, config.distributed.pp_layers)
    pretrained, lora = config.model.get("pretrained"), config.lora
    if lora.enabled:  # the targets must match in the whole model (checked on the meta device: no memory)
        with torch.device("meta"):
            apply_lora(MLATransformer(mcfg), lora.targets, lora.r, lora.alpha, lora.dropout)
    chunks = {}
    for c in range(v):
        stage = c * topology.pp_size + topology.pp_rank
        torch.manual_seed(config.train.seed)
        if pretrained is None:
            chunk = MLATransformer(mcfg, topology, specs[stage])
        else:
            chunk = load_pretrained(pretrained, topology, specs[stage])
        if lora.enabled:  # before moving: an NF4 base reaches the device already quantized
            apply_lora(
                chunk,
                lora.targets,
                lora.r,
                lora.alpha,
                lora.dropout,
                lora.quantize_base,
                seed=config.train.seed,
                require_match=False,
            )
        if config.train.precision in ("bf16", "fp16"):  # 16-bit weights; fp32 masters in ZeroOptimizer
            chunk = chunk.to(torch.bfloat16 if config.train.precision == "bf16" else torch.float16)
        chunk = chunk.to(topology.device)  # after the cast: the fp32 model never occupies the GPU
        chunk.set_recompute(config.distributed.recompute)
        chunk.set_sequence_parallel(config.distributed.sequence_parallel)
        if config.train.compile:  # each layer's forward; hooks (ZeRO-3, pipeline) stay outside the graph
            for layer in chunk.model.layers.values():
                layer.forward = torch.compile(layer.forward, backend=config.train.compile_backend)
        chunks[stage] = chunk
    return chunks


def save_final_weights(
    runner: ModelRunner, mcfg: MLAConfig, out_dir: Path, context: RunContext, tokenizer=None
) -> Path:
    """Full weights as `final/model.safetensors` + `final/config.json` (+ the `tokenizer.json`, so the
    folder is all that generation needs), written by global rank 0. LoRA adapters are merged in."""
    tensors = full_state(list(runner.chunks.values()), runner.topology.pp_group)
    folder = out_dir / "final"
    if context.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(mcfg.to_dict(), indent=2))
        if tokenizer is not None:
            tokenizer.save(str(folder / "tokenizer.json"))
    return folder
