"""Faults in the training loop: SIGTERM, non-finite steps, collective timeouts, and fault injection.

- SIGTERM (a preemption, torchrun stopping the job) and SIGINT (Ctrl-C) only set a flag; at the next
  step boundary every rank learns it (one all-reduce), the trainer saves a checkpoint and returns
  normally. A second SIGINT raises `KeyboardInterrupt` at once (no checkpoint).
- Non-finite loss or gradient norm: checked on every rank before the optimizer step, in the same
  all-reduce (MAX of three flags over the world: SIGTERM, bad loss, bad gradient norm), so all ranks take
  the same decision even when only one stage or replica sees the NaN. `train.on_nonfinite=raise` stops
  with `NonFiniteError` naming the step; `skip` drops the step (no update, its loss left out of the
  logged mean) and counts it; more than `train.max_skipped_steps` skipped in a row, or in all more than
  5% of `train.steps` (and more than `max_skipped_steps`), stops the run with `NonFiniteError`. Costs
  one small all-reduce and one host sync per step. Under fp16 the gradient norm is the loss scaler's
  business (an overflow skips the step and halves the scale), so only the loss is checked.
- Collective timeouts: long while starting (tokenizer training, data building on one rank while the
  others wait), `distributed.timeout_s` once the first step has run, so that a hung rank becomes an error.

Fault injection (`FaultPlan`) is a test seam: a test builds a plan and hands it to `train_once` or the
`Trainer`; without one (every production run) the loop has no injection code path at all. The plan
applies to the process it is given to: which rank, and which torchrun attempt, meets a fault is the
test's choice (tests/fault_entry.py makes it from its command line).
"""

from __future__ import annotations

import datetime
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from parallel.topology import Topology


class NonFiniteError(RuntimeError):
    """A step produced a NaN or infinite loss or gradient norm, and `train.on_nonfinite` is `raise`."""


class StepGuard:
    """Per-step agreement across ranks on SIGTERM and non-finite values (see the module docstring)."""

    def __init__(
        self, topology: Topology, on_nonfinite: str, max_skipped: int | None = None, steps: int = 0
    ) -> None:
        self.topology, self.on_nonfinite = topology, on_nonfinite
        self.max_skipped, self.steps = max_skipped, steps
        self.signalled = 0  # this process got SIGTERM (1) or SIGINT (2)
        self.stop_requested = 0  # some rank got one of them: save and stop after this step
        self.skipped: list[int] = []
        self.in_a_row = 0
        self._previous: dict = {}

    def __enter__(self) -> StepGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signalled:
            raise KeyboardInterrupt("a second Ctrl-C: stopped at once, without a checkpoint")
        self.signalled = 2 if signum == signal.SIGINT else 1

    @property
    def stop_signal(self) -> str:
        return "SIGINT" if self.stop_requested == 2 else "SIGTERM"

    def skip_step(
        self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, check_grad_norm: bool
    ) -> bool:
        """True when step `step` (1-based) must be skipped; raises under `raise`. Collective."""
        device = self.topology.device
        flags = torch.stack(
            [
                torch.tensor(float(self.signalled), device=device),  # SIGINT wins the MAX
                (~torch.isfinite(loss.detach().float())).float().to(device),
                (~torch.isfinite(grad_norm.detach().float())).float().to(device)
                if check_grad_norm
                else torch.zeros((), device=device),
            ]
        )
        if self.topology.is_distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, bad_loss, bad_norm = (int(v) for v in flags.tolist())
        self.stop_requested = max(self.stop_requested, stop)
        if not (bad_loss or bad_norm):
            self.in_a_row = 0
            return False
        what = " and ".join(w for w, bad in (("loss", bad_loss), ("gradient norm", bad_norm)) if bad)
        if self.on_nonfinite == "raise":
            raise NonFiniteError(
                f"non-finite {what} at step {step} on some rank (train.on_nonfinite=raise; 'skip' would "
                f"skip such steps)"
            )
        self.skipped.append(step)
        self.in_a_row += 1
        self._check_skip_budget(step)
        return True

    def _check_skip_budget(self, step: int) -> None:
        limit = self.max_skipped
        if limit is None:
            return
        overall = max(limit, int(0.05 * self.steps))
        if self.in_a_row > limit or len(self.skipped) > overall:
            raise NonFiniteError(
                f"{self.in_a_row} non-finite steps in a row, {len(self.skipped)} in all, at step {step}: "
                f"past train.max_skipped_steps={limit} ({limit} in a row, {overall} in all), the model is "
                f"not training (the last checkpoint is the last good state)"
            )

    def skipped_since(self, step: int) -> int:
        return sum(1 for s in self.skipped if s > step)


def set_collective_timeout(topology: Topology, seconds: float) -> None:
    """Set the timeout of every process group of this run (the world, tp, dp, pp, cp, dp x cp, and
    expert parallelism's ep and edp), e.g. from the long start-up value to the steady-state one after
    the first step. A group left out would keep the start-up timeout, so a rank lost in its collectives
    (the experts' all-to-all, their gradient all-reduce) would be noticed only after that."""
    if not topology.is_distributed:
        return
    timeout = datetime.timedelta(seconds=seconds)
    groups = (
        topology.tp_group,
        topology.dp_group,
        topology.pp_group,
        topology.cp_group,
        topology.dp_cp_group,
        topology.ep_group,
        topology.edp_group,
    )
    for group in {None, *groups}:
        dist.distributed_c10d._set_pg_timeout(timeout, group)  # no public API to change it after creation


HANG_S = 3600.0  # a FaultPlan hang: far longer than any test's collective timeout


@dataclass
class FaultPlan:
    """Faults for one process of a test run; steps are 1-based, as logged.

    `oom` lists (step, micro-batch) pairs: `torch.cuda.OutOfMemoryError` is raised in the forward of
    that micro-batch (1-based) of that step; each pair fires once, in order, so [(3, 2), (3, 1)] fails
    step 3 twice (train/monitor.py retries it with smaller micro-batches)."""

    nan_step: int | None = None  # the loss and gradients of this step become NaN
    kill_step: int | None = None  # SIGKILL after the backward of this step
    sigterm_step: int | None = None  # SIGTERM to itself after the backward of this step
    sigint_step: int | None = None  # SIGINT (Ctrl-C) to itself after the backward of this step
    nan_from_step: int | None = None  # every step from this one on is NaN
    error_step: int | None = None  # an OSError on this process after the backward of this step
    hang_step: int | None = None  # this process stops responding (sleeps) after the backward of this step
    kill_in_save_step: int | None = None  # SIGKILL while saving this step's checkpoint, before the commit
    oom: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.oom = [tuple(item) for item in self.oom]
        if any(len(item) != 2 or min(item) < 1 for item in self.oom):
            raise ValueError(f"FaultPlan.oom={self.oom!r}: expected (step, micro_batch) pairs, both >= 1")

    def after_backward(
        self, step: int, loss: torch.Tensor, parameters: Iterable[torch.nn.Parameter], zero
    ) -> torch.Tensor:
        """Apply the faults due after the backward of `step`; returns the (maybe NaN) loss."""
        if step == self.kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.sigterm_step:
            os.kill(os.getpid(), signal.SIGTERM)
        if step == self.sigint_step:
            os.kill(os.getpid(), signal.SIGINT)
        if step == self.error_step:
            raise OSError(f"injected error on this process at step {step} (a test FaultPlan)")
        if step == self.hang_step:
            time.sleep(HANG_S)  # a hung worker: only the watchdog (or the collective timeout) ends the job
        if step != self.nan_step and (self.nan_from_step is None or step < self.nan_from_step):
            return loss
        if zero is not None:
            zero.scale_grads(math.nan)
        for p in parameters:
            if p.grad is not None:
                p.grad.fill_(math.nan)
        return loss * math.nan

    def on_written(self, step: int) -> Callable[[], None] | None:
        """The `on_written` hook of `checkpoint.save` for step `step`, or None."""
        if step != self.kill_in_save_step:
            return None
        return lambda: os.kill(os.getpid(), signal.SIGKILL)

    def arm_oom(self, step: int, module: torch.nn.Module):
        """A forward pre-hook on `module` raising the planned error in step `step`, or None."""
        if not self.oom or self.oom[0][0] != step:
            return None
        _, target = self.oom.pop(0)
        calls = [0]

        def hook(module, args):
            calls[0] += 1
            if calls[0] == target:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by a test FaultPlan)")

        return module.register_forward_pre_hook(hook)
