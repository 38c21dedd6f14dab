"""Pipeline parallelism: one executor for any schedule of `parallel.pipeline.schedules`.

A pipeline rank holds one model chunk per virtual stage it owns (stage s lives on pp rank s % p). For
each action of its schedule it:

    F(i, s)  receives the activation of micro-batch i from stage s - 1 (or takes the token ids on the
             first stage), runs the chunk, and sends the output to stage s + 1 (on the last stage it
             computes the loss instead, scaled by `loss_scale`);
    B(i, s)  receives d loss / d output from stage s + 1 (or starts from the loss), runs backward, and
             sends d loss / d input to stage s - 1;
    W(i, s)  (zero-bubble only) computes the weight gradients that B(i, s) deferred.

Point-to-point traffic uses `batch_isend_irecv`: the sends produced by one action are posted together
with the receive of the next, and sends are only waited for at the end of the step, so a send never
blocks — exactly the model under which `simulate` proved the schedule free of deadlock. Every message
has a tag naming (kind, micro-batch, sending stage), so gloo matches messages by tag whatever the order.
Shapes are known in advance: every activation is (micro-batch, seq, hidden) in the model's dtype.

The executor leaves data parallelism to the caller: run `step` inside `no_sync()` of each chunk's
`DataParallel` and all-reduce the gradients once afterwards, not per micro-batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function

from parallel.pipeline.deferred_wgrad import WeightGradStore
from parallel.pipeline.schedules import Action, Schedule, build_schedule, simulate
from parallel.topology import Topology

ACTIVATION, GRADIENT = 0, 1


def schedule_forward_only(p: int, m: int, v: int = 1) -> Schedule:
    """Every micro-batch through every stage, in order (evaluation, generation)."""
    return [[Action("F", i, c * p + r) for i in range(m) for c in range(v)] for r in range(p)]


class PipelineExecutor:
    """Runs this rank's actions of a named schedule over `chunks` ({stage index: module}).

    Each chunk's `forward(x)` maps token ids (first stage) or hidden states to hidden states, and the
    last stage's `loss(x, targets)` returns a scalar. The full schedule is validated by the simulator
    at construction, before any communication.
    """

    def __init__(
        self,
        chunks: dict[int, nn.Module],
        topology: Topology,
        schedule: str,
        num_microbatches: int,
        virtual_stages: int = 1,
    ) -> None:
        self.topology = topology
        self.p, self.m, self.v = topology.pp_size, num_microbatches, virtual_stages
        self.num_stages = self.p * self.v
        expected = {c * self.p + topology.pp_rank for c in range(self.v)}
        if set(chunks) != expected:
            raise ValueError(
                f"pp rank {topology.pp_rank} must hold stages {sorted(expected)}, got {sorted(chunks)}"
            )
        self.chunks = chunks
        full = build_schedule(schedule, self.p, self.m, self.v)
        self.simulation = simulate(full, self.v)
        self.actions = full[topology.pp_rank]
        self.store = WeightGradStore() if any(a.kind == "W" for a in self.actions) else None
        self._sends: list[tuple[torch.Tensor, int, int]] = []
        self._send_works: list[dist.Work] = []

    # ------------------------------------------------------------------ point to point

    def _peer(self, stage: int) -> int:
        return self.topology.pp_ranks[stage % self.p]

    def _tag(self, kind: int, microbatch: int, from_stage: int) -> int:
        return (kind * self.num_stages + from_stage) * 4096 + microbatch % 4096

    def _send(self, tensor: torch.Tensor, to_stage: int, tag: int) -> None:
        self._sends.append((tensor.contiguous(), self._peer(to_stage), tag))

    def _exchange(self, receive: tuple[torch.Size, torch.dtype, int, int] | None) -> torch.Tensor | None:
        """Post the queued sends and (optionally) one receive in one batch; wait for the receive only."""
        ops = [dist.P2POp(dist.isend, t, peer, tag=tag) for t, peer, tag in self._sends]
        buffer = None
        if receive is not None:
            shape, dtype, from_stage, tag = receive
            buffer = torch.empty(shape, dtype=dtype, device=self.topology.device)
            ops.append(dist.P2POp(dist.irecv, buffer, self._peer(from_stage), tag=tag))
        if ops:
            works = dist.batch_isend_irecv(ops)
            self._send_works += works[: len(self._sends)]
            if receive is not None:
                works[-1].wait()
        self._sends = []
        return buffer

    def _finish_sends(self) -> None:
        self._exchange(None)
        for work in self._send_works:
            work.wait()
        self._send_works = []

    # ------------------------------------------------------------------ the step

    def step(
        self,
        inputs: Sequence[torch.Tensor],
        targets: Sequence[torch.Tensor],
        activation_shape: torch.Size | tuple[int, ...],
        dtype: torch.dtype,
        loss_scale: float | Sequence[float] = 1.0,
        extras: Sequence[dict] | None = None,
    ) -> torch.Tensor:
        """Forward and backward of all micro-batches. Returns the sum of the scaled micro-batch losses
        on the last stage (zero elsewhere); gradients are left in `.grad`.

        `loss_scale` is one factor for every micro-batch or one per micro-batch (weights of a loss
        normalised over the whole batch). `extras[i]`, when given, are keyword arguments for every
        chunk's forward and loss on micro-batch i (e.g. `document_ids`)."""
        scales = [loss_scale] * len(inputs) if isinstance(loss_scale, (int, float)) else list(loss_scale)
        extras = [{}] * len(inputs) if extras is None else extras
        saved: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        total = torch.zeros((), device=self.topology.device)
        self.compute_seconds = 0.0  # time spent computing (not waiting), for bubble measurements
        for action in self.actions:
            i, s = action.microbatch, action.stage
            chunk = self.chunks[s]
            if action.kind == "F":
                if s == 0:
                    self._exchange(None)
                    x = inputs[i]
                else:
                    x = self._exchange((activation_shape, dtype, s - 1, self._tag(ACTIVATION, i, s - 1)))
                    x.requires_grad_()
                started = time.perf_counter()
                recording = self.store.recording() if self.store is not None else _null()
                with recording, record_function("forward"):
                    if s == self.num_stages - 1:
                        out = chunk.loss(x, targets[i], **extras[i]) * scales[i]
                        total += out.detach().float()
                    else:
                        out = chunk(x, **extras[i])
                        self._send(out.detach(), s + 1, self._tag(ACTIVATION, i, s))
                self.compute_seconds += time.perf_counter() - started
                saved[(i, s)] = (x if s > 0 else None, out)
            elif action.kind == "B":
                x, out = saved.pop((i, s))
                if s == self.num_stages - 1:
                    self._exchange(None)
                    grad = None
                else:
                    grad = self._exchange((out.shape, out.dtype, s + 1, self._tag(GRADIENT, i, s + 1)))
                started = time.perf_counter()
                capturing = self.store.capturing((i, s)) if self.store is not None else _null()
                with capturing, record_function("backward"):
                    torch.autograd.backward(out, grad_tensors=grad)
                self.compute_seconds += time.perf_counter() - started
                if x is not None:
                    self._send(x.grad, s - 1, self._tag(GRADIENT, i, s))
            else:
                self._exchange(None)  # post B's gradient send now, not after this W
                started = time.perf_counter()
                with record_function("backward_weights"):
                    self.store.flush((i, s))
                self.compute_seconds += time.perf_counter() - started
        self._finish_sends()
        return total

    @torch.no_grad()
    def forward_only(
        self,
        inputs: Sequence[torch.Tensor],
        activation_shape: torch.Size | tuple[int, ...],
        dtype: torch.dtype,
        last_stage: Callable[[int, nn.Module, torch.Tensor], None],
        extras: Sequence[dict] | None = None,
    ) -> None:
        """Every micro-batch through the pipeline without gradients; on the last stage
        `last_stage(i, chunk, x)` consumes the input of the final chunk (e.g. computes a loss).
        `extras[i]`: keyword arguments for the other chunks' forward, as in `step`."""
        extras = [{}] * len(inputs) if extras is None else extras
        for action in schedule_forward_only(self.p, len(inputs), self.v)[self.topology.pp_rank]:
            i, s = action.microbatch, action.stage
            if s == 0:
                self._exchange(None)
                x = inputs[i]
            else:
                x = self._exchange((activation_shape, dtype, s - 1, self._tag(ACTIVATION, i, s - 1)))
            if s == self.num_stages - 1:
                last_stage(i, self.chunks[s], x)
            else:
                self._send(self.chunks[s](x, **extras[i]), s + 1, self._tag(ACTIVATION, i, s))
        self._finish_sends()


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
