"""ZeRO: optimizer state, fp32 master weights and gradients sharded over the data-parallel group.

Parameters are packed, per parameter group, into flat buckets (about `bucket_cap_mb` each, parameters in
reverse registration order, the order backward produces them; see parallel/data/buckets.py, which plans
them and runs the hooks). Each bucket is padded to a multiple of
the dp size N and cut into N equal chunks; rank r owns chunk r of every bucket. For every owned chunk the
rank keeps an fp32 master copy of the weights and the inner optimizer's state, so with Adam (K = 12 bytes
of master + moments per parameter) the optimizer memory per rank falls from 12 P to 12 P / N.

    stage 0  nothing sharded: fp32 master weights and gradient accumulation for 16-bit models (DDP-like)
    stage 1  state + master sharded; gradients all-reduced, each rank updates its chunks, then each
             chunk is broadcast by its owner straight into the parameters (no full-size buffer)
    stage 2  as 1, but gradients are reduce-scattered straight into the owner's fp32 gradient shard and
             the full bucket is freed right after (no full gradient kept between steps)
    stage 3  as 2, and the parameters are sharded too: gathered per unit for its forward and backward
             (parallel/data/zero3.py); one bucket per unit and parameter group

Gradients are accumulated in fp32: a hook adds each parameter's gradient (16- or 32-bit) into the fp32
bucket as soon as autograd has produced it and frees it; a bucket whose parameters are all done is
reduced asynchronously while backward carries on (stage 1: all-reduce, stage 2: reduce-scatter), unless
inside `no_sync()`. `sync_gradients()` reduces everything explicitly (the pipeline executor's path).

With `offload=True` the master weights, their gradients and the optimizer state live in (pinned) CPU
memory and the inner optimizer steps on the CPU (parallel/data/offload.py).

The result is that of the inner optimizer applied to the full, dp-averaged gradient: element-wise
optimizers (SGD, Adam, AdamW) give the same parameters as the unsharded optimizer. A block-wise one
(AdamW8bit) sees the flat buckets, padded so that every chunk holds whole quantization blocks: its blocks
tile the buckets (they may span two parameters, and every parameter gets 8-bit state), the same for any
dp size, so for the same buckets stage 1-3 at any dp equals stage 0. For such an optimizer TP-sharded
and replicated parameters never share a bucket, so replicated ones get identical blocks on every TP
rank. Global-norm clipping is `clip_grad_norm_` here, computed on the shards.

Expert parallelism (`expert_group`: the expert-data-parallel group): the routed experts' parameters
(`is_expert_parameter`) get buckets of their own, sharded over that group instead of dp, their gradients
still divided by the dp size N (parallel/data/data_parallel.py derives it); their norm is summed over
edp, then over the expert-parallel group passed to `grad_norm`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from parallel.collectives import group_rank, group_size
from parallel.data.buckets import Bucket, BucketPlan, GradientBuckets, plan_zero_buckets
from parallel.data.offload import master_chunk
from parallel.data.zero3 import ParameterSharding
from parallel.data.zero_state import consolidated_state, load_consolidated_state
from parallel.experts import is_expert_parameter
from parallel.tensor import tp_dim

ELEMENTWISE_OPTIMIZERS = ("SGD", "Adam", "AdamW", "AdamW8bit", "Adagrad", "RMSprop")


class ZeroBucket(Bucket):
    """A bucket of one parameter group: its flat fp32 gradient accumulator and this rank's chunk of it."""

    def __init__(
        self, params: list[nn.Parameter], plan: BucketPlan, group_index: int, shards: int, rank: int, group
    ):
        super().__init__(params, plan)
        self.group_index = group_index
        self.group, self.shards, self.shard_rank = group, shards, rank  # who shares the bucket
        self.device, self.dtype = params[0].device, params[0].dtype
        self.master_dtype = torch.promote_types(self.dtype, torch.float32)  # fp32, or fp64 for fp64 models
        self.chunk = self.padded // shards
        self.start = rank * self.chunk
        # Where this rank's chunk holds TP-sharded parameters (their norm is summed over tp as well).
        self.sharded_ranges = []
        for p in params:
            lo = max(self.offsets[p], self.start)
            hi = min(self.offsets[p] + p.numel(), self.start + self.chunk)
            if tp_dim(p) is not None and lo < hi:
                self.sharded_ranges.append((lo - self.start, hi - self.start))
        self.grad: torch.Tensor | None = None  # full fp32 accumulator, allocated on first use
        self.shard: torch.Tensor | None = None  # reduce-scatter output (NCCL, stage 2)
        self.drained = False  # reduced and folded into the master gradient this step
        self.folded: set[nn.Parameter] = set()  # parameters whose gradient is in `grad` this step

    def flat_params(self) -> torch.Tensor:
        flat = torch.zeros(self.padded, dtype=self.master_dtype, device=self.device)
        for p in self.params:
            self.view(flat, p).copy_(p.detach())
        return flat

    def grad_buffer(self) -> torch.Tensor:
        if self.grad is None:
            self.grad = torch.zeros(self.padded, dtype=self.master_dtype, device=self.device)
        return self.grad


class ZeroOptimizer(torch.optim.Optimizer, GradientBuckets):
    """Shard `optimizer_cls` (any element-wise torch optimizer) over the dp `group` (ZeRO stage 0-3;
    stage 3 also shards the parameters of `units`, see parallel/data/zero3.py).

    Use it instead of `DataParallel`: it reduces the gradients itself. `param_groups` are those of an
    ordinary optimizer (LR schedulers work); their hyper-parameters are passed to the inner optimizer at
    every step.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict],
        optimizer_cls: type[torch.optim.Optimizer],
        stage: int = 1,
        group: dist.ProcessGroup | None = None,
        offload: bool = False,
        bucket_cap_mb: float = 25.0,
        units: list[nn.Module] | None = None,
        expert_group: dist.ProcessGroup | None = None,
        **optimizer_kwargs,
    ) -> None:
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"distributed.zero_stage={stage!r}: expected 0, 1, 2 or 3")
        if stage == 3 and not units:
            raise ValueError("ZeRO stage 3 needs `units`: the modules whose parameters are gathered together")
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
            raise TypeError(f"optimizer_cls={optimizer_cls!r}: expected a torch.optim.Optimizer subclass")
        if optimizer_cls.__name__ not in ELEMENTWISE_OPTIMIZERS:
            raise ValueError(
                f"optimizer {optimizer_cls.__name__} cannot be sharded by ZeRO: its update is not "
                f"element-wise (supported: {', '.join(ELEMENTWISE_OPTIMIZERS)})"
            )
        super().__init__(params, defaults=optimizer_kwargs)
        self.stage, self.group, self.offload = stage, group, offload
        self.world, self.rank = group_size(group), group_rank(group)
        # Stage 0 reduces over the dp group but keeps everything whole: one "shard" per rank.
        self.shards, self.shard_rank = (1, 0) if stage == 0 else (self.world, self.rank)
        unit_of = {p: i for i, u in enumerate(units or []) for p in u.parameters()}
        # A block-wise optimizer (AdamW8bit) quantizes in blocks of `block_size` elements of the flat
        # chunks it is given: chunk boundaries on block boundaries make the blocks independent of dp.
        align = int(optimizer_kwargs.get("block_size", 256)) if optimizer_cls.__name__ == "AdamW8bit" else 1
        self.expert_group = expert_group
        experts = (
            {p for g in self.param_groups for p in g["params"] if is_expert_parameter(p)}
            if expert_group is not None
            else set()
        )
        # (group, shards, shard rank) of dense buckets, and of expert ones (sharded over edp)
        expert_shards = (1, 0) if stage == 0 else (group_size(expert_group), group_rank(expert_group))
        sharing = {False: (group, self.shards, self.shard_rank), True: (expert_group, *expert_shards)}
        buckets = []
        for index, group_ in enumerate(self.param_groups):
            for expert in (False, True):
                params = [p for p in group_["params"] if p.requires_grad and (p in experts) == expert]
                shared_by, shards, shard_rank = sharing[expert]
                plans = plan_zero_buckets(
                    [p.numel() for p in params],
                    bucket_cap_mb,
                    shards,
                    align,
                    units=[unit_of.get(p) for p in params],
                    tp_sharded=[tp_dim(p) is not None for p in params],
                    storage=[(p.dtype, p.device) for p in params],
                )
                for plan in plans:
                    members = [params[i] for i in plan.members]
                    buckets.append(ZeroBucket(members, plan, index, shards, shard_rank, shared_by))
                    buckets[-1].expert = expert
        self._attach_buckets(buckets)
        self.masters = [master_chunk(b.flat_params()[b.start : b.start + b.chunk], offload) for b in buckets]
        inner_groups = []
        for index, group_ in enumerate(self.param_groups):
            hyper = {k: v for k, v in group_.items() if k != "params"}
            masters = [m for m, b in zip(self.masters, buckets, strict=True) if b.group_index == index]
            inner_groups.append({"params": masters, **hyper})
        self.inner = optimizer_cls(inner_groups, **optimizer_kwargs)
        self.sharding = ParameterSharding(self, units) if stage == 3 else None

    # ------------------------------------------------------------------ gradient reduction

    def _take_grad(self, bucket: ZeroBucket, p: nn.Parameter) -> None:
        if p.grad is not None:
            bucket.view(bucket.grad_buffer(), p).add_(p.grad)
            p.grad = None  # its values live on in fp32: freeing it keeps one full gradient, not two
        bucket.folded.add(p)

    def _start_reduction(self, bucket: ZeroBucket) -> None:
        grad = bucket.grad_buffer()
        if self.world == 1:
            return
        grad.div_(self.world)  # expert buckets too: N loss slices (parallel/data/data_parallel.py)
        if group_size(bucket.group) == 1:
            return
        if self.stage >= 2 and dist.get_backend(bucket.group) != "gloo":
            bucket.shard = torch.empty(bucket.chunk, dtype=grad.dtype, device=grad.device)
            bucket.handle = dist.reduce_scatter_tensor(bucket.shard, grad, group=bucket.group, async_op=True)
        else:  # stage 0/1, or gloo (whose reduce-scatter is slower than all-reduce): keep the chunk
            bucket.handle = dist.all_reduce(grad, group=bucket.group, async_op=True)

    def _after_launch(self) -> None:
        if self.stage >= 2 and self._next_to_launch >= 3:
            self._drain(self._next_to_launch - 3)  # two reductions stay in flight, older ones are freed

    def _drain(self, index: int) -> None:
        """Wait for bucket `index`'s reduction, add this rank's chunk to its master gradient, and (stage
        2-3) free the full bucket at once, so full gradients do not pile up during backward."""
        bucket, master = self.buckets[index], self.masters[index]
        if bucket.drained:
            return
        if bucket.handle is not None:
            bucket.handle.wait()
            bucket.handle = None
        chunk = (
            bucket.shard
            if bucket.shard is not None
            else bucket.grad[bucket.start : bucket.start + bucket.chunk]
        )
        if master.grad is None:  # freed between steps by zero_grad; 0 + chunk, exactly as before
            master.grad = torch.zeros_like(master)
        master.grad.add_(chunk.to(master.device, non_blocking=True))
        bucket.shard = None
        if self.stage >= 2:
            bucket.grad = None  # only the owner's shard is kept
        else:
            bucket.grad.zero_()
        bucket.drained = True

    def _end_reduction(self, index: int) -> None:
        self._drain(index)
        self.buckets[index].drained = False
        self.buckets[index].folded.clear()

    def sync_gradients(self) -> None:
        """Reduce everything now: for callers that ran every backward inside `no_sync()` (pipelines)."""
        super().sync_gradients()
        if self.sharding is not None:
            self.sharding.release_all()

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def grad_norm(
        self,
        tp_group: dist.ProcessGroup | None = None,
        pp_group: dist.ProcessGroup | None = None,
        ep_group: dist.ProcessGroup | None = None,
    ) -> torch.Tensor:
        """Global L2 norm of the reduced gradient: shards summed over dp (expert shards over edp, then
        over ep: each expert once), TP-sharded parameters summed over tp (replicated ones counted once),
        stages summed over pp."""
        device = self.buckets[0].device if self.buckets else torch.device("cpu")
        # [dense, expert] x [squares of TP-sharded entries, of all entries], no host sync
        sums = torch.zeros(2, 2, dtype=torch.float64, device=device)
        for bucket, master in zip(self.buckets, self.masters, strict=True):
            grad = master.grad if master.grad is not None else torch.zeros_like(master)  # freed
            sharded = sum(
                (grad[a:b].pow(2).sum(dtype=torch.float64) for a, b in bucket.sharded_ranges),
                torch.zeros((), dtype=torch.float64, device=grad.device),
            )
            sums[int(bucket.expert)] += torch.stack([sharded, grad.pow(2).sum(dtype=torch.float64)]).to(
                device
            )
        sums[:, 1] -= sums[:, 0]  # (TP-sharded, replicated)
        dense, expert = sums[0].clone(), sums[1].clone()
        for part, group in ((dense, self.group), (expert, self.expert_group)):
            if self.stage > 0 and group_size(group) > 1:
                dist.all_reduce(part, group=group)
        sharded = torch.stack([dense[0], expert[0]])
        if group_size(tp_group) > 1:
            dist.all_reduce(sharded, group=tp_group)
        expert_total = sharded[1] + expert[1]
        if group_size(ep_group) > 1:
            dist.all_reduce(expert_total, group=ep_group)
        total = sharded[0] + dense[1] + expert_total
        if group_size(pp_group) > 1:
            dist.all_reduce(total, group=pp_group)
        return total.sqrt().to(self.buckets[0].master_dtype if self.buckets else torch.float32)

    @torch.no_grad()
    def clip_grad_norm_(
        self,
        max_norm: float,
        tp_group: dist.ProcessGroup | None = None,
        pp_group: dist.ProcessGroup | None = None,
        ep_group: dist.ProcessGroup | None = None,
    ) -> torch.Tensor:
        """Scale the gradient shards so the global norm is at most `max_norm`; returns the norm before."""
        norm = self.grad_norm(tp_group, pp_group, ep_group)
        if max_norm > 0:
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            self.scale_grads(scale)
        return norm

    @torch.no_grad()
    def scale_grads(self, factor: float | torch.Tensor) -> None:
        for master in self.masters:
            if master.grad is not None:
                master.grad.mul_(factor.to(master.device) if torch.is_tensor(factor) else factor)

    @torch.no_grad()
    def step(self, closure=None):
        """Step the inner optimizer on this rank's chunks, then share the updated parameters."""
        if closure is not None:
            raise ValueError("ZeroOptimizer.step does not take a closure")
        for outer, inner in zip(self.param_groups, self.inner.param_groups, strict=True):
            inner.update({k: v for k, v in outer.items() if k != "params"})
        self.inner.step()
        if self.sharding is not None:
            self.sharding.write_back()
            return
        # Each rank's updated chunk is broadcast in turn and copied straight into the parameters it
        # covers: one chunk-sized buffer, never a full-sized one.
        for bucket, master in zip(self.buckets, self.masters, strict=True):
            group = bucket.group if bucket.group is not None else dist.group.WORLD
            mine = master.to(bucket.device, bucket.dtype, non_blocking=True)  # 16-bit if the model is
            other = torch.empty_like(mine) if bucket.shards > 1 else None
            for rank in range(bucket.shards):
                chunk = mine if rank == bucket.shard_rank else other
                if bucket.shards > 1:
                    dist.broadcast(chunk, dist.get_global_rank(group, rank), group=group)
                bucket.copy_out(chunk, rank * bucket.chunk)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients freed (the masters' too: nothing of them is held between steps), or zeroed."""
        for master in self.masters:
            if set_to_none:
                master.grad = None
            elif master.grad is not None:
                master.grad.zero_()
        for bucket in self.buckets:
            for p in bucket.params:
                p.grad = None
            if bucket.grad is not None:
                bucket.grad.zero_()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """This rank's shard: the inner optimizer's state (over its chunks) and the master weights."""
        return {
            "stage": self.stage,
            "world": self.world,
            "rank": self.rank,
            "inner": self.inner.state_dict(),
            "masters": [m.detach().clone() for m in self.masters],
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
        }

    def load_state_dict(self, state: dict) -> None:
        if (state["world"], state["rank"]) != (self.world, self.rank):
            raise ValueError(
                f"optimizer shard of rank {state['rank']}/{state['world']} cannot load into rank "
                f"{self.rank}/{self.world}; consolidate it first"
            )
        self.inner.load_state_dict(state["inner"])
        for master, saved in zip(self.masters, state["masters"], strict=True):
            master.copy_(saved)
        for group_, saved in zip(self.param_groups, state["param_groups"], strict=True):
            group_.update(saved)

    def consolidated_state_dict(self) -> dict[int, dict[str, torch.Tensor]]:
        """Per parameter (by position in `param_groups`), its full optimizer state tensors, gathered from
        every rank: {index: {state name: tensor shaped like the parameter}}; returned on every rank."""
        return consolidated_state(self)

    def load_consolidated_state_dict(self, full: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """Inverse of `consolidated_state_dict`, for any dp size (parallel/data/zero_state.py)."""
        load_consolidated_state(self, full)
