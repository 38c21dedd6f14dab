"""Data parallelism: bucketed gradient all-reduce overlapped with the backward pass.

Each of the N ranks of the dp group runs the same model on its own slice of the global batch, so the
gradient of the global mean loss is the mean of the local gradients: g = (1/N) sum_i g_i.

Gradients live in flat buckets (about `bucket_cap_mb` each, parameters in reverse registration order,
roughly the order backward produces them; planned and driven by parallel/data/buckets.py); `param.grad`
is a view into its bucket. A hook fires when a parameter's gradient is complete; when every parameter of
a bucket is done, the bucket is averaged and an asynchronous all-reduce starts while backward carries on
with earlier layers. Buckets are launched in a fixed order on every rank (never out of order) so
collectives always match. At the end of backward all outstanding reductions are awaited. Inside
`no_sync()` nothing is communicated and gradients accumulate locally, for gradient accumulation over
micro-batches.

Expert parallelism (`expert_group`, the expert-data-parallel group): a routed expert's parameters live
on one rank of each expert-parallel group, and the backward all-to-all already brings that rank the
gradient contributions of the tokens of every rank of its expert-parallel group. With N loss slices (the
dp ranks; each rank's loss is its share L_i of L = (1/N) sum_i L_i), the owner holds
sum_{i in its ep group} dL_i/dW; summing over the expert-data-parallel group (the other ep groups'
owners of the same expert) gives the sum over all N ranks, so

    g_expert = (1/N) sum_{edp ranks} g_local        N = the dense group's size, not the edp size

Expert parameters get buckets of their own, reduced over `expert_group` and divided by N.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from parallel.collectives import group_size
from parallel.data.buckets import Bucket, BucketPlan, GradientBuckets, plan_buckets
from parallel.experts import expert_parameters, is_expert_module


class _FlatGradBucket(Bucket):
    """A bucket whose flat buffer, in the parameters' dtype, is where their `.grad` tensors live."""

    def __init__(self, params: list[nn.Parameter], plan: BucketPlan, group, divisor: int) -> None:
        super().__init__(params, plan)
        self.group, self.divisor = group, divisor
        self.buffer = torch.zeros(plan.numel, dtype=params[0].dtype, device=params[0].device)
        self.views = {p: self.view(self.buffer, p) for p in params}


class DataParallel(GradientBuckets, nn.Module):
    """Wrap `module` so that backward averages its gradients over `group` (a dp process group).

    Call the wrapper like the module. Accumulate over micro-batches inside `with model.no_sync():` and run
    the last micro-batch's backward outside it. Composes with tensor parallelism: pass the dp group, and
    each parameter shard is averaged over the ranks holding that same shard. With expert parallelism,
    `expert_group` is the expert-data-parallel group (module docstring).
    """

    def __init__(
        self,
        module: nn.Module,
        group: dist.ProcessGroup | None,
        bucket_cap_mb: float = 25,
        expert_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.group, self.expert_group = group, expert_group
        self.world = group_size(group)
        experts = expert_parameters(module) if expert_group is not None else set()
        buckets = []
        if self.world > 1:
            params = [p for p in module.parameters() if p.requires_grad]
            plans = plan_buckets(
                [p.numel() for p in params],
                [(p.dtype, p.device, p in experts) for p in params],
                int(bucket_cap_mb * 2**20),
                [p.element_size() for p in params],
            )
            for plan in plans:
                members = [params[i] for i in plan.members]
                group_ = expert_group if members[0] in experts else group
                buckets.append(_FlatGradBucket(members, plan, group_, self.world))
        self._attach_buckets(buckets)
        if self.world > 1:
            self._broadcast_parameters(experts)

    @torch.no_grad()
    def _broadcast_parameters(self, experts: set[nn.Parameter]) -> None:
        """Start every dp rank from rank 0's weights (they should already agree; this makes it certain);
        expert shards (and their buffers: NF4 codes) from rank 0 of the expert-data-parallel group."""
        shards = [p for p in self.module.parameters() if p in experts]  # module order: the same on all ranks
        shards += [b for m in self.module.modules() if is_expert_module(m) for b in m.buffers()]
        mine = {id(t) for t in shards}
        dense = [t for t in [*self.module.parameters(), *self.module.buffers()] if id(t) not in mine]
        for group, tensors in ((self.group, dense), (self.expert_group, shards)):
            if tensors and group_size(group) > 1:
                src = dist.get_global_rank(group, 0)
                for tensor in tensors:
                    dist.broadcast(tensor.data, src=src, group=group)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)

    def all_reduce_gradients(self) -> None:
        """Average every gradient over the dp group now (synchronously), for callers that ran all their
        backward passes inside `no_sync()`: the pipeline executor, whose zero-bubble weight gradients
        do not pass through autograd's hooks."""
        self.sync_gradients()

    def _take_grad(self, bucket: _FlatGradBucket, p: nn.Parameter) -> None:
        view = bucket.views[p]
        if p.grad is None:
            view.zero_()
        elif p.grad.data_ptr() != view.data_ptr():
            view.copy_(p.grad)  # first backward after zero_grad(set_to_none=True), or a grad set by hand
        p.grad = view

    def _fill_missing(self, bucket: _FlatGradBucket) -> None:
        for p in bucket.params:
            if p.grad is None or p.grad.data_ptr() != bucket.views[p].data_ptr():
                bucket.views[p].zero_()
                p.grad = bucket.views[p]

    def _start_reduction(self, bucket: _FlatGradBucket) -> None:
        bucket.buffer.div_(bucket.divisor)
        if group_size(bucket.group) > 1:
            bucket.handle = dist.all_reduce(bucket.buffer, group=bucket.group, async_op=True)

    def _end_reduction(self, index: int) -> None:
        bucket = self.buckets[index]
        if bucket.handle is not None:
            bucket.handle.wait()
        bucket.handle = None
