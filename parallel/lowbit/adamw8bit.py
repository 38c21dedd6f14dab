"""AdamW with 8-bit block-wise quantized moments (Dettmers et al. 2021, "8-bit Optimizers via Block-wise
Quantization").

For each parameter p with gradient g at step t (per-parameter t, as torch.optim.AdamW):

    m, v   = dequantize(m8), dequantize(v8)                     fp32, block-wise (see parallel.lowbit.quant)
    m      = beta1 m + (1 - beta1) g
    v      = beta2 v + (1 - beta2) g^2
    p      = p (1 - lr wd) - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    m8, v8 = quantize(m), quantize(v)                            new absmax per block

The update uses the fp32 moments of this step, before they are requantized. m is stored with the signed
dynamic map, v with the unsigned one, one fp32 absmax per block of `block_size` (256) values: 2 + 8/256
= 2.03 bytes of state per parameter instead of 8. Parameters with fewer than `min_8bit_size` elements
(norms, biases) keep fp32 moments (`exp_avg`, `exp_avg_sq`) and follow torch's foreach AdamW exactly.

State per 8-bit parameter: `step` (float32 scalar on the CPU, as torch), `state1`/`state2` (uint8 codes of
the flattened parameter zero-padded to whole blocks: blocks never straddle the tensors the optimizer is
given, so as ZeRO's inner optimizer they live inside each shard) and `absmax1`/`absmax2` (fp32, one per
block).

Kernels. On the CPU, each fp32 parameter's whole step is one call of a native kernel (plain C, built at
first use: parallel.lowbit.native): per block of 256 values, decode both moments, update them and the
parameter, take the new absmaxes and re-encode, in one pass, shared among torch's intra-op threads in
work units taken from an atomic counter (so a thread on a busy core takes fewer). It performs the same
float32 operations as the eager kernel below, with the same fused multiply-adds and torch's own sqrt, and
its results are the same bits; at first use one random step through both is compared, and any difference
(or a failed build) leaves every step to the eager kernel, with one warning.

The eager kernel (other dtypes and devices, or no C compiler): the 8-bit parameters of a group are laid
end to end (each padded to whole blocks) and processed in chunks of about 2^18 values on CPU (2^24 on
GPU): small parameters share a chunk, large ones span several. Each chunk is one fused update of its
blocks, a fixed sequence of about 25 whole-chunk operations (decode, moments, update, absmax, re-encode;
uint8 codes widened to int32 only, never int64; rounding by table lookup; see
parallel.lowbit.adamw8bit_kernel), so the Python cost is per chunk, never per block. On a CPU with several
intra-op threads the chunks are shared out among that many worker threads, each running single-threaded:
one fork and one join per step rather than a parallel region per operation. The result does not depend
on the chunk size or the thread count (tested bit for bit). With `compile=True` the chunk function goes
through `torch.compile` (inductor, or triton on a GPU) instead of the native kernel, compiled on first
use for each distinct chunk size, never again for a new learning rate or step; if compilation fails the
optimizer warns once and runs eagerly. On the 2-core CPU of benchmarks/RESULTS.md the compiled kernel is
slower than both (its table lookups do not vectorise).

Non-finite gradients: before anything is modified, the step checks every gradient of every group; if any
holds a NaN or an infinity the *whole step* is skipped (no parameter, moment or step count changes, as a
loss scaler does) and `skipped_steps` is incremented. This costs one host synchronisation per step.

`state_dict()` returns copies (a snapshot, not live views) and `load_state_dict()` restores every tensor
exactly as saved (torch's default would cast the fp32 absmaxes to the parameter dtype), adopting the saved
hyper-parameters as torch does; a state that does not fit a parameter is rejected, naming the parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from parallel.lowbit.adamw8bit_kernel import (
    SIGNED_MAP,
    SIGNED_ZERO,
    UNSIGNED_MAP,
    CompiledChunkKernel,
    MomentTables,
    adamw8bit_chunk,
    native_step,
    run_chunks,
)

CHUNK_NUMEL = {"cpu": 2**18}
DEFAULT_CHUNK_NUMEL = 2**24


@dataclass
class _Piece:
    """Blocks [first_block, end_block) of one parameter's padded state, in a chunk."""

    param: torch.Tensor
    first_block: int
    end_block: int


def _plan_chunks(params: list[torch.Tensor], block_size: int, chunk_blocks: int) -> list[list[_Piece]]:
    chunks: list[list[_Piece]] = [[]]
    room = chunk_blocks
    for p in params:
        blocks, start = -(-p.numel() // block_size), 0
        while start < blocks:
            if room == 0:
                chunks.append([])
                room = chunk_blocks
            take = min(room, blocks - start)
            chunks[-1].append(_Piece(p, start, start + take))
            start += take
            room -= take
    return [c for c in chunks if c]


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with block-wise 8-bit moments; see the module docstring for the algorithm and the state."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        block_size: int = 256,
        min_8bit_size: int = 4096,
        compile: bool = False,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr={lr}: expected a non-negative learning rate")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas={betas}: expected two values in [0, 1)")
        if not eps >= 0.0:
            raise ValueError(f"eps={eps}: expected a non-negative value")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay={weight_decay}: expected a non-negative value")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r}: expected a positive integer")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            block_size=block_size,
            min_8bit_size=min_8bit_size,
        )
        super().__init__(params, defaults)
        self.compile = compile
        self.skipped_steps = 0
        self._kernel: Callable[..., tuple[torch.Tensor, ...]] | None = None
        self._plans: dict[tuple, list[list[_Piece]]] = {}
        self._tables: dict[torch.device, MomentTables] = {}

    # ------------------------------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return loss
        if any(g.is_sparse for g in grads):
            raise RuntimeError("AdamW8bit does not support sparse gradients")
        if not self._all_finite(grads):
            self.skipped_steps += 1
            return loss
        for group in self.param_groups:
            self._step_group(group)
        return loss

    @staticmethod
    def _all_finite(grads: list[torch.Tensor]) -> bool:
        # A sum is one fast vectorised pass and is finite when every term is, barring overflow of the
        # sum itself; only a non-finite sum pays for the exact element-wise check.
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        for same_device in by_device.values():
            sums = torch.stack([g.sum(dtype=torch.float32) for g in same_device])
            if not bool(sums.isfinite().all()):
                if not all(bool(g.isfinite().all()) for g in same_device):
                    return False
        return True

    def _step_group(self, group: dict) -> None:
        quantized, full = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                self._init_state(p, state, group)
            state["step"] += 1
            (quantized if "state1" in state else full).append(p)
        if full:
            self._step_fp32(group, full)
        if quantized:
            self._step_8bit(group, quantized)

    def _init_state(self, p: torch.Tensor, state: dict, group: dict) -> None:
        state["step"] = torch.tensor(0.0)
        if p.numel() < group["min_8bit_size"]:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            return
        blocks = -(-p.numel() // group["block_size"])
        padded = blocks * group["block_size"]
        state["state1"] = torch.full((padded,), SIGNED_ZERO, dtype=torch.uint8, device=p.device)
        state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        state["state2"] = torch.zeros(padded, dtype=torch.uint8, device=p.device)
        state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)

    def _scalars(self, group: dict, params: list[torch.Tensor]) -> tuple[list[float], list[float]]:
        """Per parameter: lr / (1 - beta1^t) and sqrt(1 - beta2^t), as torch computes them."""
        beta1, beta2 = group["betas"]
        steps = [self.state[p]["step"].item() for p in params]
        step_size = [group["lr"] / (1 - beta1**t) for t in steps]
        bias_correction2_sqrt = [(1 - beta2**t) ** 0.5 for t in steps]
        return step_size, bias_correction2_sqrt

    def _step_fp32(self, group: dict, params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        weights = [p if p.dtype == torch.float32 else p.float() for p in params]
        grads = [p.grad.float() for p in params]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        step_size, bias_correction2_sqrt = self._scalars(group, params)
        if group["weight_decay"] != 0:
            torch._foreach_mul_(weights, 1 - group["lr"] * group["weight_decay"])
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(weights, exp_avgs, denom, [-s for s in step_size])
        for p, w in zip(params, weights, strict=True):
            if w is not p:
                p.copy_(w)

    def _step_8bit(self, group: dict, params: list[torch.Tensor]) -> None:
        for p in params:
            if not p.is_contiguous():
                raise RuntimeError("AdamW8bit updates parameters through flat views: make them contiguous")
        beta1, beta2 = group["betas"]
        block_size = group["block_size"]
        device = params[0].device
        tables = self._tables.get(device) or self._tables.setdefault(device, MomentTables.build(device))
        step_size, bias_correction2_sqrt = self._scalars(group, params)
        per_param = {id(p): (s, b) for p, s, b in zip(params, step_size, bias_correction2_sqrt, strict=True)}
        decay = 1 - group["lr"] * group["weight_decay"]
        if not self.compile:  # fp32 CPU parameters: the native kernel, one call per parameter
            eps = group["eps"]
            params = [
                p
                for p in params
                if not native_step(
                    p, self.state[p], tables, (beta1, beta2, eps, *per_param[id(p)][::-1], decay)
                )
            ]
            if not params:
                return
        kernel = self._chunk_kernel()

        def step_chunk(chunk: list[_Piece]) -> None:
            g, codes1, absmax1, codes2, absmax2 = self._gather(chunk, block_size)
            scalars = [per_param[id(piece.param)] for piece in chunk]
            if all(s == scalars[0] for s in scalars):
                chunk_bias2 = scalars[0][1]
            else:
                blocks = torch.tensor([piece.end_block - piece.first_block for piece in chunk])
                chunk_bias2 = torch.tensor([b for _, b in scalars], device=device)
                chunk_bias2 = chunk_bias2.repeat_interleave(blocks.to(device)).unsqueeze(1)
            u, *new_state = kernel(
                g, codes1, absmax1, codes2, absmax2, tables, beta1, beta2, group["eps"], chunk_bias2
            )
            self._scatter(chunk, block_size, new_state)
            self._apply(chunk, block_size, u, [s for s, _ in scalars], decay)

        run_chunks(step_chunk, self._plan(params, block_size, device), device)

    def _chunk_kernel(self) -> Callable[..., tuple[torch.Tensor, ...]]:
        if self._kernel is None:
            self._kernel = CompiledChunkKernel() if self.compile else adamw8bit_chunk
        return self._kernel

    def _plan(self, params: list[torch.Tensor], block_size: int, device: torch.device) -> list[list[_Piece]]:
        key = (block_size, *(id(p) for p in params))
        if key not in self._plans:
            chunk_numel = CHUNK_NUMEL.get(device.type, DEFAULT_CHUNK_NUMEL)
            self._plans[key] = _plan_chunks(params, block_size, max(1, chunk_numel // block_size))
        return self._plans[key]

    def _gather(self, chunk: list[_Piece], block_size: int) -> list[torch.Tensor]:
        """The chunk's gradient (fp32, zero-padded) and state, as flat tensors (views when one piece)."""
        grads, state_parts = [], {k: [] for k in ("state1", "absmax1", "state2", "absmax2")}
        for piece in chunk:
            p, state = piece.param, self.state[piece.param]
            start, end = piece.first_block * block_size, piece.end_block * block_size
            grads.append(p.grad.reshape(-1)[start:end].float())
            if end > p.numel():
                grads.append(grads[-1].new_zeros(end - p.numel()))
            for key in ("state1", "state2"):
                state_parts[key].append(state[key][start:end])
            for key in ("absmax1", "absmax2"):
                state_parts[key].append(state[key][piece.first_block : piece.end_block])
        flat = [grads, *state_parts.values()]
        return [parts[0] if len(parts) == 1 else torch.cat(parts) for parts in flat]

    def _scatter(self, chunk: list[_Piece], block_size: int, new_state: list[torch.Tensor]) -> None:
        codes1, absmax1, codes2, absmax2 = new_state
        offset = 0
        for piece in chunk:
            state = self.state[piece.param]
            blocks = piece.end_block - piece.first_block
            codes = slice(piece.first_block * block_size, piece.end_block * block_size)
            local = slice(offset * block_size, (offset + blocks) * block_size)
            state["state1"][codes].copy_(codes1[local])
            state["state2"][codes].copy_(codes2[local])
            state["absmax1"][piece.first_block : piece.end_block].copy_(absmax1[offset : offset + blocks])
            state["absmax2"][piece.first_block : piece.end_block].copy_(absmax2[offset : offset + blocks])
            offset += blocks

    @staticmethod
    def _apply(
        chunk: list[_Piece], block_size: int, u: torch.Tensor, step_size: list[float], decay: float
    ) -> None:
        """p = p * decay - step_size * u on each piece's real (unpadded) elements, while they are in cache."""
        weights, updates, offset = [], [], 0
        for piece in chunk:
            p = piece.param
            start = piece.first_block * block_size
            end = min(piece.end_block * block_size, p.numel())
            weights.append(p.view(-1)[start:end])
            updates.append(u[offset : offset + end - start])
            offset += (piece.end_block - piece.first_block) * block_size
        if decay != 1:
            torch._foreach_mul_(weights, decay)
        # one call per distinct step size, so that a parameter's arithmetic never depends on its neighbours
        for size in dict.fromkeys(step_size):
            chosen = [i for i, s in enumerate(step_size) if s == size]
            torch._foreach_add_([weights[i] for i in chosen], [updates[i] for i in chosen], alpha=-size)

    # ---------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        state_dict = super().state_dict()
        state_dict["state"] = {
            index: {key: value.clone() if torch.is_tensor(value) else value for key, value in state.items()}
            for index, state in state_dict["state"].items()
        }
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a `state_dict()`. As in torch, the saved hyper-parameters (including `block_size` and
        `min_8bit_size`, which the saved state was built with) replace the constructor's."""
        saved_groups = state_dict["param_groups"]
        super().load_state_dict(state_dict)
        # torch casts floating-point state to the parameter's dtype; put back the exact saved tensors
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            for index, p in zip(saved["params"], group["params"], strict=True):
                if index not in state_dict["state"]:
                    continue
                restored = {}
                for key, value in state_dict["state"][index].items():
                    if not torch.is_tensor(value):
                        restored[key] = value
                    elif key == "step":
                        restored[key] = value.detach().to("cpu", torch.float32, copy=True)
                    else:
                        restored[key] = value.detach().to(p.device, copy=True)
                self._check_state(index, p, restored, group)
                self.state[p] = restored
        self._plans.clear()

    @staticmethod
    def _check_state(index: int, p: torch.Tensor, state: dict, group: dict) -> None:
        if "state1" in state:
            block_size = group["block_size"]
            blocks = -(-p.numel() // block_size)
            if state["state1"].numel() != blocks * block_size or state["absmax1"].numel() != blocks:
                raise ValueError(
                    f"parameter {index}: its saved 8-bit state holds {state['state1'].numel()} codes, not "
                    f"{blocks * block_size} ({p.numel()} elements in blocks of {block_size})"
                )
        elif state.get("exp_avg") is not None and state["exp_avg"].shape != p.shape:
            raise ValueError(
                f"parameter {index}: saved state of shape {tuple(state['exp_avg'].shape)}, "
                f"parameter of shape {tuple(p.shape)}"
            )


__all__ = ["SIGNED_MAP", "UNSIGNED_MAP", "AdamW8bit", "MomentTables", "adamw8bit_chunk"]
