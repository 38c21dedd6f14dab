"""Expert parallelism: the routed experts of an MoE layer split over the `ep` ranks of an expert-parallel
group, tokens moved to their experts and back by all-to-all (`dispatch`), and the marking that tells
gradient reduction, clipping, ZeRO and checkpoints which parameters are expert shards (`params`)."""

from parallel.experts.params import (
    expert_parameters,
    is_expert_module,
    is_expert_parameter,
    mark_expert_module,
)
from parallel.experts.token_dispatch import DispatchPlan, all_to_all, combine, dispatch, local_expert_range

__all__ = [
    "DispatchPlan",
    "all_to_all",
    "combine",
    "dispatch",
    "expert_parameters",
    "is_expert_module",
    "is_expert_parameter",
    "local_expert_range",
    "mark_expert_module",
]
