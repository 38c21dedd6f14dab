"""Which parameters are expert shards.

Under expert parallelism a routed expert's parameters live on one rank of each expert-parallel group, so
they differ between the data-parallel ranks of one group: their gradients are reduced over the
expert-data-parallel group only, their norm is summed over the expert-parallel group, their optimizer
state is sharded over the expert-data-parallel group, and a checkpoint writes them from every
expert-parallel rank. The MoE layer marks each routed expert's module (`mark_expert_module`); every
parameter under a marked module is an expert parameter, adapters added later (LoRA) included, once
`expert_parameters` has walked the model.
"""

from __future__ import annotations

import torch
from torch import nn


def mark_expert_module(module: nn.Module) -> None:
    """Mark `module` (a routed expert) and the parameters it holds now as expert shards."""
    module.expert_parallel = True
    for p in module.parameters():
        p.expert_parallel = True


def expert_parameters(model: nn.Module) -> set[nn.Parameter]:
    """Every parameter under a marked module (and marks it, for `is_expert_parameter`)."""
    found = set()
    for module in model.modules():
        if getattr(module, "expert_parallel", False):
            for p in module.parameters():
                p.expert_parallel = True
                found.add(p)
    return found


def is_expert_module(module: nn.Module) -> bool:
    return getattr(module, "expert_parallel", False)


def is_expert_parameter(param: torch.Tensor) -> bool:
    return getattr(param, "expert_parallel", False)
