"""This rank's share of a run, from its config and layout: the model parts (fresh, pretrained, LoRA,
16-bit, compiled), the optimizer (AdamW or 8-bit AdamW, plain or inside a ZeroOptimizer), the runner
that trains them. The final weights are written by train/hf_folder.py.

Every chunk is built from the same seed, so the full weights do not depend on the layout; each rank
keeps its tensor-parallel shard of the stages it holds (train/layout.py's stage plan).
"""

from __future__ import annotations

import torch

from models.config import MLAConfig
from models.deepseek import load_pretrained
from models.transformer import MLATransformer
from parallel.data import ZeroOptimizer
from parallel.data.zero3 import default_units
from parallel.experts import expert_parameters
from parallel.lowbit.adamw8bit import AdamW8bit
from parallel.lowbit.lora import apply_lora
from parallel.pipeline import ModelParts
from parallel.topology import Topology
from train.config import Config
from train.layout import Layout, rank_stages, uses_zero
from train.runner import ModelRunner


def _build_chunk(config: Config, mcfg: MLAConfig, topology: Topology, spec) -> MLATransformer:
    pretrained, lora = config.model.get("pretrained"), config.lora
    torch.manual_seed(config.train.seed)
    if pretrained is None:
        chunk = MLATransformer(mcfg, topology, spec)
    else:
        chunk = load_pretrained(pretrained, topology, spec)
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
    expert_parameters(chunk)  # marks the routed experts' parameters, LoRA adapters included
    if config.train.precision in ("bf16", "fp16"):  # 16-bit weights; fp32 masters in ZeroOptimizer
        chunk = chunk.to(torch.bfloat16 if config.train.precision == "bf16" else torch.float16)
    chunk = chunk.to(topology.device)  # after the cast: the fp32 model never occupies the GPU
    chunk.set_recompute(config.distributed.recompute)
    chunk.set_sequence_parallel(config.distributed.sequence_parallel)
    if config.train.compile:  # each layer's forward; hooks (ZeRO-3, pipeline) stay outside the graph
        for layer in chunk.model.layers.values():
            layer.forward = torch.compile(layer.forward, backend=config.train.compile_backend)
    return chunk


def build_model(config: Config, mcfg: MLAConfig, topology: Topology) -> ModelParts:
    """This rank's model chunks, keyed by (virtual) pipeline stage: {0: whole model} without pipeline."""
    lora = config.lora
    if lora.enabled:  # the targets must match in the whole model (checked on the meta device: no memory)
        with torch.device("meta"):
            apply_lora(MLATransformer(mcfg), lora.targets, lora.r, lora.alpha, lora.dropout)
    stages = rank_stages(config, mcfg, topology.pp_rank)
    return ModelParts({stage: _build_chunk(config, mcfg, topology, spec) for stage, spec in stages.items()})


def build_optimizer(parts: ModelParts, config: Config, topology: Topology) -> torch.optim.Optimizer:
    """AdamW (`optim.name: adamw`) or 8-bit AdamW (`adamw8bit`), weight decay on matrices only (not on
    norms and biases); wrapped in a ZeroOptimizer over the dp x cp group (every rank holding the same
    parameters) when `uses_zero(config)`, expert parameters' state over the expert-data-parallel group
    when ep > 1."""
    parts = ModelParts.of(parts)
    params = [p for p in parts.parameters() if p.requires_grad]
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
    if not uses_zero(config):
        return inner_cls(groups, **hyper)
    dc = config.distributed
    units = [u for chunk in parts.chunks for u in default_units(chunk)] if dc.zero_stage == 3 else None
    return ZeroOptimizer(
        groups,
        inner_cls,
        dc.zero_stage,
        topology.dp_cp_group,
        dc.offload_optimizer,
        dc.bucket_cap_mb,
        units,
        topology.edp_group if topology.ep_size > 1 else None,  # expert state over edp
        **hyper,
    )


def build_runner(
    parts: ModelParts, layout: Layout, topology: Topology, optimizer: torch.optim.Optimizer
) -> ModelRunner:
    """The runner of `parts`; a ZeroOptimizer, when there is one, averages the gradients over dp x cp."""
    dc = layout.config.distributed
    return ModelRunner(
        parts,
        topology,
        micro_batch_size=layout.micro_batch_size,
        num_microbatches=layout.num_microbatches,
        seq_len=layout.config.data.seq_len,
        precision=layout.config.train.precision,
        pp_schedule=dc.pp_schedule,
        virtual_stages=dc.virtual_stages,
        bucket_cap_mb=dc.bucket_cap_mb,
        grad_sync=optimizer if isinstance(optimizer, ZeroOptimizer) else None,
    )
