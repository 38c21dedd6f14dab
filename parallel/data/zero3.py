"""ZeRO stage 3: the parameters themselves are sharded over the dp group.

On top of stage 2 (sharded optimizer state, master weights and gradients) each rank keeps only its chunk
of every parameter. The model is cut into units (the embedding, each decoder layer, the final norm, the
head); a unit's parameters are all-gathered just before its forward and freed right after, gathered
again just before its backward and freed once all its gradients have been reduce-scattered. While a
unit runs, the next one is prefetched (an asynchronous all-gather), in forward order during forward and
in reverse order during backward. Per rank, parameters, gradients and optimizer state all scale as 1/N;
only the units in flight are whole.

Each bucket of a unit is gathered into one flat buffer that lives for the whole run; freeing it frees
its *storage* (`untyped_storage().resize_(0)`) and points each parameter at an empty tensor; gathering
resizes the same storage and points the parameters back at views of it. Autograd saves parameters by
reference and their views (`weight.t()` in a linear layer) by storage, so a backward sees the
re-gathered values, and no saved view keeps a released unit's memory alive between its forward and its
backward. The optimizer step writes each rank's updated chunk; nothing is gathered until the next forward.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

# The embedding unit's inputs are token ids: torch warns that its backward pre-hook fires with respect to
# outputs only, which is exactly what the re-gather needs.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with")


def default_units(model: nn.Module) -> list[nn.Module]:
    """The gather units of an MLATransformer (stage): embedding, each decoder layer, norm, head."""
    backbone = model.model
    units = [
        getattr(backbone, "embed_tokens", None),
        *backbone.layers.values(),
        getattr(backbone, "norm", None),
    ]
    units.append(getattr(model, "lm_head", None))
    return [u for u in units if u is not None]


class ParameterSharding:
    """Shards the parameters of `units` for a stage-3 `ZeroOptimizer` and gathers them on demand."""

    def __init__(self, optimizer, units: list[nn.Module]) -> None:
        self.opt = optimizer
        self.units = units
        unit_of_param = {p: i for i, u in enumerate(units) for p in u.parameters()}
        self.unit_buckets: list[list] = [[] for _ in units]
        for bucket in optimizer.buckets:
            owners = {unit_of_param.get(p) for p in bucket.params}
            if None in owners or len(owners) != 1:
                raise ValueError("ZeRO-3: every bucket must lie inside one unit (build it with `units=`)")
            self.unit_buckets[owners.pop()].append(bucket)
        self.gathered = [False] * len(units)
        self.pending: dict[int, list] = {}  # unit -> its all-gathers in flight
        self.folded = [0] * len(units)
        self.num_params = [sum(len(b.params) for b in buckets) for buckets in self.unit_buckets]
        for bucket, master in zip(optimizer.buckets, optimizer.masters, strict=True):
            if master.dtype == bucket.dtype and master.device == bucket.device:
                bucket.param_chunk = master  # fp32 model, no offload: the master *is* the shard
            else:
                flat = bucket.flat_params().to(bucket.dtype)
                bucket.param_chunk = flat[bucket.start : bucket.start + bucket.chunk].clone()
        for index in range(len(units)):
            self._release(index)
        for index, unit in enumerate(units):
            unit.register_forward_pre_hook(lambda m, args, i=index: self._before(i, forward=True))
            unit.register_forward_hook(lambda m, args, out, i=index: self._after_forward(i))
            unit.register_full_backward_pre_hook(lambda m, grad, i=index: self._before(i, forward=False))
            for bucket in self.unit_buckets[index]:
                for p in bucket.params:
                    p.register_post_accumulate_grad_hook(lambda p, i=index: self._after_grad(i))

    # ------------------------------------------------------------------ gather / release

    def _start_gather(self, index: int) -> None:
        if self.gathered[index] or index in self.pending:
            return
        works = []
        for bucket in self.unit_buckets[index]:
            flat = self._buffer(bucket)
            with torch.autograd._unsafe_preserve_version_counter(flat):  # refilled, not modified
                if bucket.shards > 1:  # over dp, or over edp for expert buckets
                    works.append(
                        dist.all_gather(
                            list(flat.chunk(bucket.shards)), bucket.param_chunk, bucket.group, True
                        )
                    )
                else:
                    flat.copy_(bucket.param_chunk)
        self.pending[index] = works

    @staticmethod
    def _buffer(bucket) -> torch.Tensor:
        """The bucket's gathered flat buffer, its storage (re)allocated. One storage per bucket for the
        whole run: views that autograd saved in forward (`weight.t()`) read the re-gathered values."""
        flat = getattr(bucket, "gathered_flat", None)
        if flat is None:
            flat = bucket.gathered_flat = torch.empty(bucket.padded, dtype=bucket.dtype, device=bucket.device)
        storage = flat.untyped_storage()
        if storage.nbytes() == 0:
            storage.resize_(bucket.padded * flat.element_size())
        return flat

    def _finish_gather(self, index: int) -> None:
        self._start_gather(index)
        for work in self.pending.pop(index, []):
            work.wait()
        for bucket in self.unit_buckets[index]:
            for p in bucket.params:
                p.data = bucket.view(bucket.gathered_flat, p)
        self.gathered[index] = True

    def _release(self, index: int, keep_views: bool = False) -> None:
        """Point the unit's parameters at empty tensors and free the gathered storage itself, which
        views saved by autograd would otherwise keep alive. With `keep_views` (after handing the whole
        parameters to a caller) the buffer is dropped instead, so that views the caller kept stay valid."""
        for bucket in self.unit_buckets[index]:
            for p in bucket.params:
                p.data = torch.empty(0, dtype=bucket.dtype, device=bucket.device)
            flat = getattr(bucket, "gathered_flat", None)
            if keep_views:
                bucket.gathered_flat = None
            elif flat is not None:
                flat.untyped_storage().resize_(0)
        self.gathered[index] = False

    # ------------------------------------------------------------------ hooks

    def _before(self, index: int, forward: bool) -> None:
        if not self.gathered[index]:
            self._finish_gather(index)
        if forward and torch._C._current_graph_task_id() != -1:
            return  # activation recompute inside backward: the next unit in forward order is not needed
        following = index + 1 if forward else index - 1
        if 0 <= following < len(self.units):
            self._start_gather(following)  # prefetch

    def _after_forward(self, index: int) -> None:
        # A forward run inside backward is activation recompute: its backward follows at once, keep them.
        if torch._C._current_graph_task_id() == -1:
            self._release(index)

    def _after_grad(self, index: int) -> None:
        self.folded[index] += 1
        if self.folded[index] == self.num_params[index]:
            self.folded[index] = 0
            self._release(index)

    def release_all(self) -> None:
        """Free every unit and restart the gradient counts (after an explicit `sync_gradients`)."""
        for index in range(len(self.units)):
            self._release(index)
        self.folded = [0] * len(self.units)

    @contextlib.contextmanager
    def gathered_parameters(self) -> Iterator[None]:
        """All parameters whole (to save or export them), released again afterwards."""
        for index in range(len(self.units)):
            self._finish_gather(index)
        try:
            yield
        finally:
            for index in range(len(self.units)):
                self._release(index, keep_views=True)

    def write_back(self) -> None:
        """After the optimizer step: each rank's updated master chunk becomes its parameter chunk, and
        any gather still in flight (it carries the old values) is dropped."""
        for works in self.pending.values():
            for work in works:
                work.wait()
        self.pending.clear()
        self.release_all()
        for bucket, master in zip(self.opt.buckets, self.opt.masters, strict=True):
            if bucket.param_chunk is not master:
                bucket.param_chunk.copy_(master.to(bucket.device, non_blocking=True))
