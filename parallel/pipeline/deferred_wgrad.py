"""Deferred weight gradients for zero-bubble pipeline schedules.

For a linear layer Y = X W^T + b the backward pass has two independent parts:

    B (input gradient):   dX = dY W          needed at once by the previous pipeline stage
    W (weight gradient):  dW = dY^T X, db = sum dY    needed only by the optimizer step

Zero-bubble schedules run B on the critical path and postpone W into what would otherwise be idle time.
While a `WeightGradStore` is active in forward (`store.recording()`), every linear layer of this library
saves what W needs; its backward computes only dX and queues the W work under the key being captured
(`store.capturing(key)`, the micro-batch and stage). `store.flush(key)` later runs that work and
accumulates into `.grad`. Other parameters (norms, embeddings) get their gradients during B as usual.
Outside `recording()` the linear layers are plain `F.linear`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Hashable, Iterator

import torch
import torch.nn.functional as F

_state = threading.local()


class WeightGradStore:
    """Queues of deferred weight-gradient work, keyed by (micro-batch, stage)."""

    def __init__(self) -> None:
        self._queues: dict[Hashable, list[Callable[[], None]]] = {}
        self._key: Hashable | None = None

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Linear layers called inside this block defer their weight gradients to this store."""
        previous = getattr(_state, "store", None)
        _state.store = self
        try:
            yield
        finally:
            _state.store = previous

    @contextlib.contextmanager
    def capturing(self, key: Hashable) -> Iterator[None]:
        """Weight-gradient work produced by a backward inside this block is queued under `key`."""
        self._key = key
        self._queues.setdefault(key, [])
        try:
            yield
        finally:
            self._key = None

    def defer(self, work: Callable[[], None]) -> None:
        if self._key is None:
            work()  # a backward outside any capture (e.g. a plain loss.backward()): do it now
        else:
            self._queues[self._key].append(work)

    def flush(self, key: Hashable) -> None:
        # Outside backward grad mode is on: without no_grad, dW = dY^T X would record a graph through the
        # saved activations X and could not be added in place into a gradient bucket's view.
        with torch.no_grad():
            for work in self._queues.pop(key, []):
                work()

    def pending(self) -> int:
        return sum(len(q) for q in self._queues.values())


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


class _DeferredWeightGradLinear(torch.autograd.Function):
    """Y = X W^T + b whose backward returns dX and queues dW, db in the store."""

    @staticmethod
    def forward(ctx, x, weight, bias, store):
        device_type = x.device.type
        ctx.autocast = (
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )
        ctx.store, ctx.weight, ctx.bias = store, weight, bias  # parameters: held by reference
        ctx.save_for_backward(x)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        weight, bias = ctx.weight, ctx.bias
        device_type, enabled, dtype = ctx.autocast
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            grad_x = torch.matmul(grad_out, weight) if ctx.needs_input_grad[0] else None
        compute_dtype = dtype if enabled else weight.dtype

        def weight_grad() -> None:
            g2d = grad_out.reshape(-1, grad_out.shape[-1]).to(compute_dtype)
            x2d = x.reshape(-1, x.shape[-1]).to(compute_dtype)
            _accumulate(weight, g2d.t() @ x2d)
            if bias is not None:
                _accumulate(bias, g2d.sum(0))

        ctx.store.defer(weight_grad)
        return grad_x, None, None, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or its deferred-weight-gradient form inside `WeightGradStore.recording()`."""
    store = getattr(_state, "store", None)
    if store is None or not (weight.requires_grad and torch.is_grad_enabled()):
        return F.linear(x, weight, bias)
    return _DeferredWeightGradLinear.apply(x, weight, bias, store)


class Linear(torch.nn.Linear):
    """nn.Linear that takes part in zero-bubble weight-gradient deferral (for replicated layers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
