"""What a config means on a (dp, tp, pp) grid: the model config, the batch split, the stage plan, the
resolved config and the combinations that cannot run. The trainer, the memory estimator and the planner
all read a config through this module, so they agree on every number and refuse the same layouts.

- Model config: `MLAConfig` defaults, the vocabulary size (the tokenizer's in a run, `data.vocab_size`
  when planning), then the user's `model` keys; or, with `model.pretrained`, the folder's own config,
  which the user's keys must agree with (except the training-only MoE keys `aux_loss_alpha` and
  `router_bias_update_rate`, which a folder does not carry).
- Batch split: the global batch of B sequences is cut into dp equal slices of B / dp rows, and each
  slice into m micro-batches of b rows, b m = B / dp, from `train.micro_batch_size` or
  `distributed.num_microbatches` (they must agree when both are set).
- Stage plan: the layers are split over pp x v stages (v = `distributed.virtual_stages`); pipeline rank
  r holds stages r, r + pp, ..., r + (v - 1) pp.
- Supported combinations are checked on the resolved model config (a pretrained folder's
  `tie_embeddings` counts even when the user did not type it).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from models.config import MLAConfig
from models.deepseek import read_config
from models.transformer import MLATransformer, StageSpec, split_layers
from parallel.lowbit.lora import target_matches
from parallel.lowbit.quant import nf4_shard_layout
from parallel.tensor import ColumnParallelLinear, RowParallelLinear
from train.config import Config, ConfigError, DataConfig

if TYPE_CHECKING:
    from train.data import Dataset

# model keys a run may set over a pretrained folder's config: how to train, not what the model computes
TRAINING_ONLY_KEYS = ("aux_loss_alpha", "router_bias_update_rate")


def model_config(config: Config, vocab_size: int) -> MLAConfig:
    """The model a run of `config` builds; `vocab_size` fills `model.vocab_size` when it is left open."""
    fields = {k: v for k, v in config.model.items() if k != "pretrained"}
    pretrained = config.model.get("pretrained")
    if pretrained is None:
        fields.setdefault("vocab_size", vocab_size)
        mcfg = MLAConfig(**fields)
    else:
        try:
            mcfg = read_config(pretrained)
        except (OSError, ValueError) as error:
            raise ConfigError(f"model.pretrained={pretrained!r}: {error}") from None
        for key, value in fields.items():
            if getattr(mcfg, key) != value and key not in TRAINING_ONLY_KEYS:
                theirs = getattr(mcfg, key)
                raise ConfigError(
                    f"model.{key}={value!r}: the pretrained model {pretrained} has {key}={theirs!r}"
                )
    if mcfg.is_moe:
        changed = {k: fields[k] for k in TRAINING_ONLY_KEYS if k in fields and pretrained is not None}
        mcfg = replace(mcfg, **changed) if changed else mcfg
    if config.data.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"data.seq_len={config.data.seq_len}: exceeds model.max_seq_len={mcfg.max_seq_len}")
    return mcfg


def check_tokens(mcfg: MLAConfig, dataset: Dataset) -> None:
    """Every token id of the data must have a row in the embedding."""
    if dataset.max_token_id >= mcfg.vocab_size:
        raise ConfigError(
            f"model.vocab_size={mcfg.vocab_size}: the data contains token id {dataset.max_token_id}, at or "
            f"above the vocabulary size (the tokenizer has {dataset.vocab_size} tokens)"
        )


def _expert_parallel_problem(config: Config, mcfg: MLAConfig) -> str | None:
    """Why expert parallelism (ep > 1) cannot run this config, or None (docs/moe.md: what composes)."""
    dc = config.distributed
    if mcfg.n_routed_experts % dc.ep:
        return (
            f"model.n_routed_experts={mcfg.n_routed_experts} is not divisible by distributed.ep={dc.ep}: "
            "experts are split evenly over the expert-parallel ranks"
        )
    return None


def unsupported(config: Config, mcfg: MLAConfig) -> str | None:
    """Why `config` (with its layout) cannot run the model `mcfg`, in one line naming the keys; or None."""
    dc = config.distributed
    if dc.ep > 1 and not mcfg.is_moe:
        return f"distributed.ep={dc.ep} needs a mixture-of-experts model (model.n_routed_experts > 0)"
    if dc.ep > 1:
        problem = _expert_parallel_problem(config, mcfg)
        if problem:
            return problem
    if dc.cp > 1:
        problem = _context_parallel_problem(config, mcfg)
        if problem:
            return problem
    if dc.zero_stage == 3 and dc.pp > 1 and dc.pp_schedule == "zb1p":
        return (
            "distributed.pp_schedule='zb1p' with distributed.zero_stage=3: zero-bubble defers weight "
            "gradients past the point where ZeRO-3 frees a layer's parameters; use 1f1b or zero_stage 2"
        )
    if dc.zero_stage == 3 and mcfg.tie_embeddings:
        return (
            "model.tie_embeddings=true with distributed.zero_stage=3 is not supported: the tied LM head "
            "reads the embedding outside the unit ZeRO-3 gathers it for; use zero_stage 2"
        )
    if dc.pp > 1 and mcfg.tie_embeddings:
        return (
            f"model.tie_embeddings=true with distributed.pp={dc.pp}: tied embeddings are not supported with "
            "pipeline parallelism (pp > 1)"
        )
    if mcfg.is_moe and dc.sequence_parallel and (dc.tp or 1) > 1:
        return (
            "distributed.sequence_parallel=true with mixture-of-experts layers (model.n_routed_experts="
            f"{mcfg.n_routed_experts}) is not supported yet: the router would see a slice of the sequence"
        )
    if mcfg.is_moe and mcfg.aux_loss_alpha and dc.pp > 1:
        return (
            f"model.aux_loss_alpha={mcfg.aux_loss_alpha} with distributed.pp={dc.pp}: the balance loss is "
            "added on the last stage only, so it needs pp = 1 (or aux_loss_alpha 0 / router_bias_update_rate)"
        )
    data = config.data
    if data.mixture is not None and data.corpus != "stdlib":
        return f"data.corpus={data.corpus!r} with data.mixture: give the corpora in data.mixture only"
    formats = {data.format, *(e.get("format", data.format) for e in data.mixture or [])}
    if data.chat_template is not None and not formats & {"chat", "auto"}:
        return f"data.chat_template={data.chat_template!r}: no source has data.format chat (or auto)"
    if dc.sequence_parallel and config.data.seq_len % (dc.tp or 1):
        return (
            f"data.seq_len={config.data.seq_len}: sequence parallelism splits the sequence over "
            f"distributed.tp={dc.tp} ranks, so it must be divisible by it"
        )
    return _nf4_split_problem(config, mcfg)


def _context_parallel_problem(config: Config, mcfg: MLAConfig) -> str | None:
    """What context parallelism (cp > 1) cannot run with: each sequence is cut into 2 cp zigzag pieces
    (and each rank's part over tp under sequence parallelism); attention runs in parallel/context/."""
    dc, seq, tc = config.distributed, config.data.seq_len, config.train
    cp, tp = dc.cp, dc.tp or 1
    if mcfg.is_moe:
        return (
            f"distributed.cp={cp} with mixture-of-experts layers (model.n_routed_experts="
            f"{mcfg.n_routed_experts}) is not supported: the router's balance loss needs the whole sequence"
        )
    if seq % (2 * cp):
        return (
            f"data.seq_len={seq}: distributed.cp={cp} splits each sequence into 2 x cp pieces, so it must "
            f"be divisible by {2 * cp}"
        )
    if dc.sequence_parallel and tp > 1 and (seq // cp) % tp:
        return (
            f"data.seq_len={seq}: with distributed.cp={cp} and sequence_parallel over distributed.tp={tp}, "
            f"each rank's {seq // cp} tokens must be divisible by tp"
        )
    if mcfg.dropout > 0:
        return f"model.dropout={mcfg.dropout} with distributed.cp={cp} is not supported (use dropout 0)"
    if config.lora.enabled and config.lora.dropout > 0:
        return f"lora.dropout={config.lora.dropout} with distributed.cp={cp} is not supported (use dropout 0)"
    if tc.curriculum_start_seq_len is not None:
        return (
            f"train.curriculum_start_seq_len with distributed.cp={cp} is not supported (one sequence length)"
        )
    return None


@functools.lru_cache(maxsize=16)
def _split_linears(model_json: str) -> tuple[tuple[str, int, tuple[int, ...]], ...]:
    """(name, split dim, full weight shape) of every column- (0) and row-parallel (1) linear of a model."""
    with torch.device("meta"):
        model = MLATransformer(MLAConfig(**json.loads(model_json)))
    kinds = ((ColumnParallelLinear, 0), (RowParallelLinear, 1))
    return tuple(
        (name, dim, tuple(module.weight.shape))
        for name, module in model.named_modules()
        for kind, dim in kinds
        if isinstance(module, kind)
    )


def _nf4_split_problem(config: Config, mcfg: MLAConfig) -> str | None:
    """NF4 bases are quantized in blocks of the full weight, so each tp shard must hold whole blocks."""
    tp, lora = config.distributed.tp or 1, config.lora
    if tp == 1 or not lora.enabled or lora.quantize_base != "nf4":
        return None
    for name, dim, shape in _split_linears(json.dumps(mcfg.to_dict(), sort_keys=True)):
        if not target_matches(name, lora.targets):
            continue
        try:
            nf4_shard_layout(shape, dim, 0, tp)
        except ValueError as error:
            return f"lora.quantize_base='nf4' with distributed.tp={tp}: {name}: {error}"
    return None


def ignored_settings(config: Config, tp: int, vocab_size: int) -> list[str]:
    """Settings that have no effect in this run, one line each naming the key (warnings, not errors)."""
    notes = []
    if config.distributed.sequence_parallel and tp == 1:
        notes.append("distributed.sequence_parallel=true has no effect with tp=1 (nothing to split over)")
    given = config.data.tokenizer or config.model.get("pretrained")
    if given and config.data.vocab_size != DataConfig.vocab_size:
        notes.append(
            f"data.vocab_size={config.data.vocab_size} is unused: the vocabulary is that of the given "
            f"tokenizer ({vocab_size} tokens)"
        )
    return notes


def check_supported(config: Config, mcfg: MLAConfig) -> None:
    """Raise `ConfigError` when `unsupported(config, mcfg)` finds a reason."""
    reason = unsupported(config, mcfg)
    if reason:
        raise ConfigError(reason)


def batch_split(config: Config, dp: int) -> tuple[int, int]:
    """(micro_batch_size, micro-batches per step) of one dp rank (see the module docstring)."""
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


def rank_stages(config: Config, mcfg: MLAConfig, pp_rank: int) -> dict[int, StageSpec]:
    """{global stage index: its layers} of pipeline rank `pp_rank`, in stage order."""
    dc = config.distributed
    specs = split_layers(mcfg.num_layers, dc.pp * dc.virtual_stages, dc.pp_layers)
    stages = (c * dc.pp + pp_rank for c in range(dc.virtual_stages))
    return {stage: specs[stage] for stage in stages}


def uses_zero(config: Config) -> bool:
    """ZeroOptimizer owns the gradients when sharding, offloading, or keeping fp32 master weights for a
    16-bit model (stage 0)."""
    dc = config.distributed
    return dc.zero_stage > 0 or dc.offload_optimizer or config.train.precision in ("bf16", "fp16")


@dataclass(frozen=True)
class Layout:
    """A config resolved for a grid: explicit dp, tp and micro-batch size, the whole model config."""

    config: Config
    model: MLAConfig
    micro_batch_size: int
    num_microbatches: int

    @classmethod
    def resolve(cls, config: Config, mcfg: MLAConfig, dp: int, tp: int) -> Layout:
        """Split the batch, write the resolved values into the config, then check the combination."""
        mbs, m = batch_split(config, dp)
        resolved = replace(
            config,
            model={**mcfg.to_dict(), "pretrained": config.model.get("pretrained")},
            distributed=replace(config.distributed, dp=dp, tp=tp),
            train=replace(config.train, micro_batch_size=mbs),
        )
        check_supported(resolved, mcfg)
        return cls(resolved, mcfg, mbs, m)
