"""Live memory monitor and out-of-memory recovery for the training loop.

Monitor (`MemoryMonitor.sample`, at every logged step): on a GPU, torch's caching allocator reports the
bytes held by live tensors (`mem_allocated_gib`), the bytes it has reserved from the driver
(`mem_reserved_gib`) and the peak allocation since the previous record (`mem_peak_gib`); NVML (pynvml,
as nvidia-smi) reports the device's memory in use by every process and context (`mem_device_used_gib`)
out of `mem_device_total_gib`. Without pynvml the driver's free/total (`torch.cuda.mem_get_info`) stands
in. Everywhere the process's resident set (`mem_rss_gib`) and the host's memory in use
(`mem_host_used_gib` of `mem_host_total_gib`) are reported. Each value is the maximum over all ranks. A
warning is logged when the memory in use (device on GPU, host on CPU) exceeds `train.mem_warn_fraction`
of the total.

Out-of-memory recovery (`OOMRecovery.train_step`): when a step raises `torch.cuda.OutOfMemoryError`, the
partial step is discarded (gradient buffers zeroed, in-flight reductions finished, ZeRO-3 units
released), memory is freed (`gc.collect`, `torch.cuda.empty_cache`), the micro-batch is halved (the
largest divisor of it at most half of it) and the number of micro-batches per step grows in proportion,
and the step is retried on the same rows. The global batch, and so the loss curve, is unchanged up to the
order of floating-point sums. At micro-batch 1 the run stops with the estimator's breakdown and advice
(`OutOfMemoryStop`). Every rank must meet the error at the same point, as symmetric data- and
tensor-parallel ranks do; a pipeline stage that runs out of memory alone leaves the others waiting in a
receive until `distributed.timeout_s`.

Tests inject the error through a `train.faults.FaultPlan` (its `oom` pairs) handed to the trainer; a
run without a plan has no injection path.
"""

from __future__ import annotations

import gc
import os
import resource
from collections.abc import Callable

import torch
import torch.distributed as dist

from train.config import ConfigError
from train.faults import FaultPlan

GIB = 2**30


class OutOfMemoryStop(ConfigError):
    """Out of memory at micro-batch 1: the configuration does not fit the device (one-line message)."""


def process_rss() -> int:
    """Resident set size of this process, in bytes."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, in KiB on Linux


def host_memory() -> tuple[int, int]:
    """(bytes in use, total bytes) of the host's memory (in use = total - available)."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return vm.total - vm.available, vm.total
    except ImportError:
        pass
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"] - info.get("MemAvailable", info.get("MemFree", 0)), info["MemTotal"]


def device_memory(device: torch.device) -> tuple[int, int]:
    """(bytes in use by every process, total bytes) of a CUDA device: NVML when pynvml is installed,
    else the driver's free/total."""
    free, total = torch.cuda.mem_get_info(device)
    try:
        return torch.cuda.device_memory_used(device), total
    except Exception:  # no pynvml, or NVML cannot be initialised: the driver's numbers instead
        return total - free, total


class MemoryMonitor:
    """Samples memory at each logged step (see the module docstring); all ranks must call `sample`."""

    def __init__(self, device: torch.device, warn_fraction: float = 0.9) -> None:
        self.device = device
        self.warn_fraction = warn_fraction
        self.cuda = device.type == "cuda"

    def sample(self) -> dict[str, float]:
        values: dict[str, float] = {}
        if self.cuda:
            values["mem_allocated_gib"] = torch.cuda.memory_allocated(self.device)
            values["mem_reserved_gib"] = torch.cuda.memory_reserved(self.device)
            values["mem_peak_gib"] = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            values["mem_device_used_gib"], values["mem_device_total_gib"] = device_memory(self.device)
        values["mem_rss_gib"] = process_rss()
        values["mem_host_used_gib"], values["mem_host_total_gib"] = host_memory()
        names = list(values)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            packed = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=self.device)
            dist.all_reduce(packed, op=dist.ReduceOp.MAX)
            values = dict(zip(names, packed.tolist(), strict=True))
        return {k: round(float(v) / GIB, 3) for k, v in values.items()}

    def describe(self, fields: dict[str, float]) -> str:
        """The progress-line part: device used/total and peak on GPU, resident set size on CPU."""
        if "mem_device_used_gib" in fields:
            return (
                f"mem {fields['mem_device_used_gib']:.1f}/{fields['mem_device_total_gib']:.1f} GiB "
                f"(peak {fields['mem_peak_gib']:.1f})"
            )
        return f"rss {fields['mem_rss_gib']:.2f} GiB"

    def warning(self, fields: dict[str, float]) -> str | None:
        """A warning line when memory in use exceeds `warn_fraction` of the total, else None."""
        kind = "device" if "mem_device_used_gib" in fields else "host"
        used, total = fields[f"mem_{kind}_used_gib"], fields[f"mem_{kind}_total_gib"]
        if total <= 0 or used / total <= self.warn_fraction:
            return None
        return (
            f"warning: {kind} memory {used:.2f} of {total:.2f} GiB in use ({used / total:.0%}), above "
            f"train.mem_warn_fraction={self.warn_fraction}"
        )


def _reset_gradient_state(runner, optimizer: torch.optim.Optimizer) -> None:
    """Discard a step that failed part-way: finish in-flight reductions, restore the bucket counters of
    DataParallel / ZeroOptimizer, release ZeRO-3 units, zero every gradient accumulated so far."""
    for sync in runner.grad_syncs:
        for bucket in sync.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
                bucket.handle = None
            bucket.pending = len(bucket.params)
            if hasattr(bucket, "folded"):  # ZeroOptimizer's
                bucket.folded.clear()
                bucket.shard = None
            if getattr(bucket, "buffer", None) is not None:  # DataParallel's
                bucket.buffer.zero_()
        sync._next_to_launch = 0
        sync._callback_queued = False
        sharding = getattr(sync, "sharding", None)
        if sharding is not None:
            for works, _ in sharding.pending.values():
                for work in works:
                    work.wait()
            sharding.pending.clear()
            sharding.release_all()
    optimizer.zero_grad(set_to_none=False)


class OOMRecovery:
    """Runs `runner.train_step`, retrying with smaller micro-batches after CUDA out-of-memory errors."""

    def __init__(
        self,
        runner,
        optimizer: torch.optim.Optimizer,
        log: Callable[[str], None],
        explain: Callable[[], str],
        faults: FaultPlan | None = None,
    ) -> None:
        self.runner, self.optimizer, self.log, self.explain = runner, optimizer, log, explain
        self.retries = 0
        self.faults = faults

    def train_step(self, step: int, batch: torch.Tensor, *args) -> torch.Tensor:
        """`runner.train_step(batch, *args)` for 1-based step `step`, recovering from out of memory."""
        while True:
            hook = None if self.faults is None else self.faults.arm_oom(step, self.runner.parts.first)
            try:
                return self.runner.train_step(batch, *args)
            except torch.cuda.OutOfMemoryError as error:
                reason = str(error).splitlines()[0] if str(error) else "CUDA out of memory"
            finally:
                if hook is not None:
                    hook.remove()
            # outside the except block: the traceback, and the activations its frames hold, are gone
            self._recover(step, reason)

    def _recover(self, step: int, reason: str) -> None:
        mbs, m = self.runner.mbs, self.runner.m
        _reset_gradient_state(self.runner, self.optimizer)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if mbs == 1:
            self.log(self.explain())
            raise OutOfMemoryStop(
                f"train.micro_batch_size=1: out of memory at step {step} ({reason}); the estimate and "
                "advice are printed above (python -m train.plan finds layouts that fit)"
            )
        smaller = max(d for d in range(1, mbs // 2 + 1) if mbs % d == 0)
        self.runner.set_micro_batches(smaller, m * (mbs // smaller))
        self.retries += 1
        self.log(
            f"out of memory at step {step} with micro-batch {mbs} ({reason}): memory freed, retrying with "
            f"{m * (mbs // smaller)} micro-batches of {smaller} (same global batch)"
        )


def oom_explanation(config, mcfg, topology) -> str:
    """The estimator's breakdown of `config` at micro-batch 1 and the planner's advice (for the stop)."""
    from dataclasses import replace

    from train.plan import explain_oom

    one = replace(
        config,
        train=replace(config.train, micro_batch_size=1),
        distributed=replace(config.distributed, num_microbatches=None, pp=topology.pp_size),
    )
    name, total = "", 0
    if topology.device.type == "cuda":
        name = torch.cuda.get_device_name(topology.device)
        total = torch.cuda.get_device_properties(topology.device).total_memory
    return explain_oom(one, mcfg, topology.world_size, name, total)
