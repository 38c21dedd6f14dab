"""Where a training step's time goes: data, compute, exposed communication, optimizer, checkpoint.

Each step is cut into phases on the host clock: `data` (choosing and moving the batch), `compute`
(forward and backward), `optimizer` (gradient clipping, the non-finite check, the update) and
`checkpoint` (a save; with `train.async_save` only the copy to host memory). `comm` is the time blocked
in torch.distributed calls — a synchronous collective from call to return, an asynchronous one inside
its handle's `wait()` — whatever phase issued it, and is taken out of that phase. So gradient all-reduces
that overlap the backward cost nothing here; only the wait they leave at its end counts.

`CommTimer` measures `comm` by wrapping the torch.distributed collectives while a step runs (on the
training thread only: a background checkpoint writer's barriers are not counted); each call also runs in
a profiler region named after its kind (`all_reduce`, `all_gather`, ...), which the traces of
train/profiling.py show. On CUDA, where kernels run asynchronously, the phase boundaries of the logged
step of each window synchronize the device so that host times are kernel times; the other steps are not
synchronized (that would drain the device's queue at every phase of every step) and not measured, so
there the means are those of the logged steps (`train.time_breakdown: false` turns the breakdown off).
NCCL collectives are then mostly counted as compute, since the host does not block on them.

The record of a logging window carries per-step means: `time_step_s` (the wall time of the steps,
measured apart from the phases) and `time_{data,compute,comm,optimizer,checkpoint}_s`, whose sum is
`time_step_s` up to the few statements between phases.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.profiler import record_function

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "batch_isend_irecv",
)  # not isend/irecv themselves: P2POp checks that it is given those very functions
PHASES = ("data", "compute", "comm", "optimizer", "checkpoint")


class _TimedWork:
    """An asynchronous collective's handle whose `wait()` is timed; everything else is the handle's."""

    def __init__(self, work, timer: CommTimer, kind: str) -> None:
        self._work, self._timer, self._kind = work, timer, kind

    def wait(self, *args, **kwargs):
        with self._timer.blocked(f"{self._kind}.wait"):
            return self._work.wait(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._work, name)


class CommTimer:
    """While active (`with timer:`), adds the time the installing thread spends blocked in
    torch.distributed collectives to `seconds`."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._saved: dict[str, object] = {}
        self._owner: int | None = None
        self._depth = 0  # collectives built from others (all_gather_object) count once

    @contextlib.contextmanager
    def blocked(self, kind: str) -> Iterator[None]:
        if threading.get_ident() != self._owner or self._depth:
            yield
            return
        self._depth += 1
        start = time.perf_counter()
        try:
            with record_function(kind):
                yield
        finally:
            self.seconds += time.perf_counter() - start
            self._depth -= 1

    def _wrap(self, kind: str, fn):
        def timed(*args, **kwargs):
            with self.blocked(kind):
                result = fn(*args, **kwargs)
            if isinstance(result, list):
                return [_TimedWork(w, self, kind) if w is not None else w for w in result]
            return _TimedWork(result, self, kind) if hasattr(result, "wait") else result

        return timed

    def __enter__(self) -> CommTimer:
        self._owner = threading.get_ident()
        for kind in COLLECTIVES:
            if hasattr(dist, kind):
                self._saved[kind] = getattr(dist, kind)
                setattr(dist, kind, self._wrap(kind, self._saved[kind]))
        return self

    def __exit__(self, *exc) -> None:
        for kind, fn in self._saved.items():
            setattr(dist, kind, fn)
        self._saved.clear()
        self._owner = None


class StepTimer:
    """Per-step phase times of a logging window (see the module docstring). Disabled, it still names
    the phases and collectives for the profiler but never synchronizes a device and reports nothing."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled, self.device = enabled, device
        self.comm = CommTimer()
        self._phase: tuple | None = None
        self._measuring = True  # this step counts (and, on CUDA, synchronizes the device)
        self._reset()

    def _reset(self) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.step_seconds, self.steps = 0.0, 0

    def _sync(self) -> None:
        if self.enabled and self._measuring and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def step(self, logged: bool = True) -> Iterator[None]:
        """One training step: its wall time, and collectives timed while it runs. On CUDA only `logged`
        steps are measured (see the module docstring); elsewhere every step is, at no cost."""
        self._measuring = logged or self.device.type != "cuda"
        self._sync()
        start = time.perf_counter()
        try:
            with self.comm:
                yield
        finally:
            self.switch(None)
        self._sync()
        if self._measuring:
            self.step_seconds += time.perf_counter() - start
            self.steps += 1
        self._measuring = True

    def switch(self, name: str | None) -> None:
        """End the current phase (if any) and start phase `name` (None: none). Its blocked collective
        time goes to `comm`; each phase is also a profiler region."""
        if self._phase is not None:
            phase, start, comm_before, region = self._phase
            self._phase = None
            self._sync()
            comm = self.comm.seconds - comm_before
            if self._measuring:
                self.totals[phase] += time.perf_counter() - start - comm
                self.totals["comm"] += comm
            region.__exit__(None, None, None)
        if name is not None:
            self._sync()
            region = record_function(name)
            region.__enter__()
            self._phase = (name, time.perf_counter(), self.comm.seconds, region)

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[None]:
        """A checkpoint save between steps: counted both in its phase and in the step time."""
        start = time.perf_counter()
        with self.comm:
            self.switch("checkpoint")
            try:
                yield
            finally:
                self.switch(None)
        self.step_seconds += time.perf_counter() - start

    def record(self) -> dict[str, float]:
        """The window's per-step means (empty when disabled), and a new window."""
        if not self.enabled or not self.steps:
            return {}
        n = self.steps
        entry = {"time_step_s": self.step_seconds / n}
        entry.update({f"time_{name}_s": self.totals[name] / n for name in PHASES})
        self._reset()
        return entry
