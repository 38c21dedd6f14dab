"""Gradient buckets: the one place that decides which gradients are reduced together, and when.

Planning (`plan_buckets`, pure arithmetic, also used by the memory estimator). The trainable parameters
of one list, taken in reverse registration order (about the order backward produces their gradients), are
cut into runs: a run closes before a parameter of another *kind* (dtype and device; for ZeRO also the
stage-3 unit, and, for a block-wise optimizer, TP-sharded vs replicated) and once it holds `cap_bytes` or
more. A run of numels n_1 .. n_k becomes a flat bucket with offsets 0, n_1, n_1 + n_2, ... and
numel S = sum n_i, padded to

    padded = ceil(S / (shards * align)) * shards * align

so that it cuts into `shards` equal chunks, each holding whole blocks of `align` elements (ZeRO's dp
chunks; AdamW8bit's quantization blocks). DataParallel uses shards = align = 1.

Running (`GradientBuckets`, a base class of `DataParallel` and `ZeroOptimizer`). A post-accumulate-grad
hook moves each finished gradient into its bucket's flat buffer (the subclass says how: a view, or an fp32
sum). When a bucket's last gradient has arrived it is reduced asynchronously while backward carries on,
but always in bucket order, so that every rank issues the same collectives in the same order. A callback
queued at the end of backward reduces the buckets whose parameters got no gradient and waits for all.
Inside `no_sync()` gradients only accumulate; `sync_gradients()` reduces everything at once, for callers
whose backward passes all ran inside `no_sync()` (the pipeline executor).
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class BucketPlan:
    """One bucket: `members` are positions in the planned list (bucket order), `offsets` their starts."""

    members: tuple[int, ...]
    offsets: tuple[int, ...]
    numel: int
    padded: int


def plan_buckets(
    numels: Sequence[int],
    kinds: Sequence[Hashable],
    cap_bytes: int,
    bytes_per_element: int | Sequence[int] = 4,
    shards: int = 1,
    align: int = 1,
) -> list[BucketPlan]:
    """Cut parameters (`numels` and `kinds` in registration order) into buckets, as the module docstring
    says: reverse order, a new bucket at each change of kind or once `cap_bytes` is reached, each padded
    to a multiple of `shards` x `align`."""
    sizes = [bytes_per_element] * len(numels) if isinstance(bytes_per_element, int) else bytes_per_element
    runs: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for i in reversed(range(len(numels))):
        if current and (kinds[current[0]] != kinds[i] or current_bytes >= cap_bytes):
            runs.append(current)
            current, current_bytes = [], 0
        current.append(i)
        current_bytes += numels[i] * sizes[i]
    if current:
        runs.append(current)
    multiple = shards * align
    plans = []
    for run in runs:
        offsets = [0]
        for i in run[:-1]:
            offsets.append(offsets[-1] + numels[i])
        numel = offsets[-1] + numels[run[-1]]
        plans.append(BucketPlan(tuple(run), tuple(offsets), numel, -(-numel // multiple) * multiple))
    return plans


def plan_zero_buckets(
    numels: Sequence[int],
    cap_mb: float,
    shards: int,
    align: int = 1,
    units: Sequence[Hashable] | None = None,
    tp_sharded: Sequence[bool] | None = None,
    storage: Sequence[Hashable] | None = None,
) -> list[BucketPlan]:
    """`ZeroOptimizer`'s buckets for one parameter group: fp32, so the cap counts whole fp32 elements;
    never across stage-3 `units` or `storage` ((dtype, device) of each parameter); and, for a block-wise
    optimizer (`align` > 1), never mixing TP-sharded and replicated parameters, so that replicated ones
    get identical quantization blocks on every TP rank."""
    count = len(numels)
    kinds = [
        (
            units[i] if units is not None else None,
            storage[i] if storage is not None else None,
            tp_sharded[i] if align > 1 and tp_sharded is not None else None,
        )
        for i in range(count)
    ]
    cap_bytes = 4 * int(cap_mb * 2**20 / 4)
    return plan_buckets(numels, kinds, cap_bytes, 4, shards, align)


class Bucket:
    """A planned bucket at run time: its parameters, their places in the flat buffer, the reduction."""

    def __init__(self, params: list[nn.Parameter], plan: BucketPlan) -> None:
        self.params = params
        self.offsets = dict(zip(params, plan.offsets, strict=True))
        self.shapes = {p: p.shape for p in params}  # kept: ZeRO-3 empties parameters between uses
        self.numel, self.padded = plan.numel, plan.padded
        self.pending = len(params)  # gradients still to arrive before the bucket can be reduced
        self.handle: dist.Work | None = None

    def view(self, flat: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
        """`p`'s place in a flat tensor laid out like this bucket, shaped like `p`."""
        offset, shape = self.offsets[p], self.shapes[p]
        return flat[offset : offset + shape.numel()].view(shape)

    def copy_out(self, chunk: torch.Tensor, start: int) -> None:
        """Copy `chunk`, elements [start, start + len) of a flat tensor laid out like this bucket, into
        the parameters it covers."""
        end = start + chunk.numel()
        for p in self.params:
            lo, hi = self.offsets[p], self.offsets[p] + p.numel()
            a, b = max(lo, start), min(hi, end)
            if a < b:
                p.detach().view(-1)[a - lo : b - lo].copy_(chunk[a - start : b - start])


class GradientBuckets:
    """Hooks, in-order asynchronous reduction and `no_sync` over `self.buckets`.

    A subclass calls `_attach_buckets` once and says how a gradient enters its bucket (`_take_grad`),
    what a bucket whose parameters got no gradient holds (`_fill_missing`), how a full bucket's
    reduction starts (`_start_reduction`) and how it ends (`_end_reduction`).
    """

    def _attach_buckets(self, buckets: list[Bucket]) -> None:
        self.buckets = buckets
        self.bucket_of = {p: b for b in buckets for p in b.params}
        self.sync_enabled = True
        self._next_to_launch = 0
        self._callback_queued = False
        for bucket in buckets:
            for p in bucket.params:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally; the first backward outside the block reduces everything."""
        previous, self.sync_enabled = self.sync_enabled, False
        try:
            yield
        finally:
            self.sync_enabled = previous

    def sync_gradients(self) -> None:
        """Reduce every bucket now, and wait: for callers that ran every backward inside `no_sync()`."""
        for bucket in self.buckets:
            for p in bucket.params:
                self._take_grad(bucket, p)
            bucket.pending = 0
        self._finish_reduction()

    def _on_grad_ready(self, p: nn.Parameter) -> None:
        bucket = self.bucket_of[p]
        self._take_grad(bucket, p)
        if not self.sync_enabled:
            return
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_reduction)
            self._callback_queued = True
        bucket.pending -= 1
        if bucket.pending == 0:
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next_to_launch < len(self.buckets) and self.buckets[self._next_to_launch].pending == 0:
            self._start_reduction(self.buckets[self._next_to_launch])
            self._next_to_launch += 1
            self._after_launch()

    def _finish_reduction(self) -> None:
        """End of backward: buckets still waiting for gradients are reduced as they are, then all end."""
        for bucket in self.buckets:
            if bucket.pending:
                self._fill_missing(bucket)
                bucket.pending = 0
        self._launch_ready()
        for index, bucket in enumerate(self.buckets):
            self._end_reduction(index)
            bucket.pending = len(bucket.params)
        self._next_to_launch = 0
        self._callback_queued = False

    def _take_grad(self, bucket: Bucket, p: nn.Parameter) -> None:
        raise NotImplementedError

    def _fill_missing(self, bucket: Bucket) -> None:
        """Make the bucket hold zeros for parameters that got no gradient (a no-op if it already does)."""

    def _start_reduction(self, bucket: Bucket) -> None:
        raise NotImplementedError

    def _after_launch(self) -> None:
        """Called after each bucket's reduction has started (ZeRO frees older buckets here)."""

    def _end_reduction(self, index: int) -> None:
        raise NotImplementedError
