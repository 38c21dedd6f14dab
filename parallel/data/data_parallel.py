"""Data parallelism: bucketed gradient all-reduce overlapped with the backward pass.

Each of the N ranks of the dp group runs the same model on its own slice of the global batch, so the
gradient of the global mean loss is the mean of the local gradients: g = (1/N) sum_i g_i.

Gradients live in flat buckets (about `bucket_cap_mb` each, parameters in reverse registration order,
roughly the order backward produces them); `param.grad` is a view into its bucket. A hook fires when a
parameter's gradient is complete; when every parameter of a bucket is done, the bucket is averaged and an
asynchronous all-reduce starts while backward carries on with earlier layers. Buckets are launched in a
fixed order on every rank (never out of order) so collectives always match. At the end of backward all
outstanding reductions are awaited. Inside `no_sync()` nothing is communicated and gradients accumulate
locally, for gradient accumulation over micro-batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from parallel.collectives import group_size


class _Bucket:
    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        numel = sum(p.numel() for p in params)
        first = params[0]
        self.buffer = torch.zeros(numel, dtype=first.dtype, device=first.device)
        self.views: dict[nn.Parameter, torch.Tensor] = {}
        offset = 0
        for p in params:
            self.views[p] = self.buffer[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self.pending = len(params)
        self.handle: dist.Work | None = None


class DataParallel(nn.Module):
    """Wrap `module` so that backward averages its gradients over `group` (a dp process group).

    Call the wrapper like the module. Accumulate over micro-batches inside `with model.no_sync():` and run
    the last micro-batch's backward outside it. Composes with tensor parallelism: pass the dp group, and
    each parameter shard is averaged over the ranks holding that same shard.
    """

    def __init__(self, module: nn.Module, group: dist.ProcessGroup | None, bucket_cap_mb: float = 25) -> None:
        super().__init__()
        self.module = module
        self.group = group
        self.world = group_size(group)
        self.sync_enabled = True
        self.buckets: list[_Bucket] = []
        self.bucket_of: dict[nn.Parameter, int] = {}
        self._next_to_launch = 0
        self._callback_queued = False
        if self.world > 1:
            self._build_buckets(bucket_cap_mb)
            self._broadcast_parameters()

    def _build_buckets(self, bucket_cap_mb: float) -> None:
        cap = int(bucket_cap_mb * 2**20)
        params = [p for p in self.module.parameters() if p.requires_grad]
        current: list[nn.Parameter] = []
        current_bytes = 0
        for p in reversed(params):
            same_kind = not current or (current[0].dtype == p.dtype and current[0].device == p.device)
            if current and (current_bytes >= cap or not same_kind):
                self.buckets.append(_Bucket(current))
                current, current_bytes = [], 0
            current.append(p)
            current_bytes += p.numel() * p.element_size()
        if current:
            self.buckets.append(_Bucket(current))
        for index, bucket in enumerate(self.buckets):
            for p in bucket.params:
                self.bucket_of[p] = index
                p.register_post_accumulate_grad_hook(self._on_grad_ready)

    @torch.no_grad()
    def _broadcast_parameters(self) -> None:
        """Start every dp rank from rank 0's weights (they should already agree; this makes it certain)."""
        src = dist.get_global_rank(self.group, 0)
        for tensor in list(self.module.parameters()) + list(self.module.buffers()):
            dist.broadcast(tensor.data, src=src, group=self.group)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally; the first backward outside the block averages everything."""
        previous, self.sync_enabled = self.sync_enabled, False
        try:
            yield
        finally:
            self.sync_enabled = previous

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)

    def all_reduce_gradients(self) -> None:
        """Average every gradient over the dp group now (synchronously), for callers that ran all their
        backward passes inside `no_sync()` — the pipeline executor, whose zero-bubble weight gradients
        do not pass through autograd's hooks."""
        if self.world == 1:
            return
        for bucket in self.buckets:
            for p in bucket.params:
                view = bucket.views[p]
                if p.grad is None:
                    view.zero_()
                elif p.grad.data_ptr() != view.data_ptr():
                    view.copy_(p.grad)
                p.grad = view
            bucket.buffer.div_(self.world)
            bucket.handle = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)
        for bucket in self.buckets:
            bucket.handle.wait()
            bucket.handle = None

    sync_gradients = all_reduce_gradients  # the name ZeroOptimizer uses for the same job

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        bucket = self.buckets[self.bucket_of[param]]
        view = bucket.views[param]
        if param.grad.data_ptr() != view.data_ptr():
            view.copy_(param.grad)  # first backward after zero_grad(set_to_none=True)
            param.grad = view
        if not self.sync_enabled:
            return
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._callback_queued = True
        bucket.pending -= 1
        if bucket.pending == 0:
            self._launch_ready_buckets()

    def _launch_ready_buckets(self) -> None:
        while self._next_to_launch < len(self.buckets) and self.buckets[self._next_to_launch].pending == 0:
            bucket = self.buckets[self._next_to_launch]
            bucket.buffer.div_(self.world)
            bucket.handle = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)
            self._next_to_launch += 1

    def _finish(self) -> None:
        """End of backward: reduce buckets whose parameters got no gradient, then wait for all."""
        for bucket in self.buckets:
            if bucket.pending:
                for p in bucket.params:
                    if p.grad is None or p.grad.data_ptr() != bucket.views[p].data_ptr():
                        bucket.views[p].zero_()
                        p.grad = bucket.views[p]
                bucket.pending = 0
        self._launch_ready_buckets()
        for bucket in self.buckets:
            bucket.handle.wait()
            bucket.handle = None
            bucket.pending = len(bucket.params)
        self._next_to_launch = 0
        self._callback_queued = False
