"""What a config means on a (dp, tp, pp) grid: the model config, the batch split, the stage plan, the
resolved config and the combinations that cannot run. The trainer, the memory estimator and the planner
all read a config through this module, so they agree on every number and refuse the same layouts.

- Model config: `MLAConfig` defaults, the vocabulary size (the tokenizer's in a run, `data.vocab_size`
  when planning), then the user's `model` keys; or, with `model.pretrained`, the folder's own config,
  which the user's keys must agree with.
- Batch split: the global batch of B sequences is cut into dp equal slices of B / dp rows, and each
  slice into m micro-batches of b rows, b m = B / dp, from `train.micro_batch_size` or
  `distributed.num_microbatches` (they must agree when both are set).
- Stage plan: the layers are split over pp x v stages (v = `distributed.virtual_stages`); pipeline rank
  r holds stages r, r + pp, ..., r + (v - 1) pp.
- Supported combinations are checked on the resolved model config (a pretrained folder's
  `tie_embeddings` counts even when the user did not type it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from models.config import MLAConfig
from models.deepseek import read_config
from models.transformer import StageSpec, split_layers
from train.config import Config, ConfigError, DataConfig

if TYPE_CHECKING:
    from train.data import Dataset


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
            if getattr(mcfg, key) != value:
                theirs = getattr(mcfg, key)
                raise ConfigError(
                    f"model.{key}={value!r}: the pretrained model {pretrained} has {key}={theirs!r}"
                )
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


def unsupported(config: Config, mcfg: MLAConfig) -> str | None:
    """Why `config` (with its layout) cannot run the model `mcfg`, in one line naming the keys; or None."""
    dc = config.distributed
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
    if dc.sequence_parallel and config.data.seq_len % (dc.tp or 1):
        return (
            f"data.seq_len={config.data.seq_len}: sequence parallelism splits the sequence over "
            f"distributed.tp={dc.tp} ranks, so it must be divisible by it"
        )
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
