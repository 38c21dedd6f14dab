"""ModelRunner: this rank's model parts — the whole model, or its pipeline chunks — and how to run them.

Without pipeline parallelism a training step runs the micro-batches one after the other, all but the
last inside `no_sync()`, so the data-parallel all-reduce overlaps the last backward. With pipeline
parallelism the `PipelineExecutor` runs the configured schedule inside `no_sync()` of every chunk and
the gradients are averaged over dp once afterwards. Under context parallelism each rank of a cp group
takes its zigzag pieces of the same rows, the gradients are averaged over dp x cp (`dp_cp_group`: every
rank holding the same parameters) and the loss is counted over the same ranks. Either way a step returns
this rank's share of the global-batch mean loss (`reduce_loss` combines the shares), and evaluation,
sampling and the full weights work the same for every layout.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.profiler import record_function

from models.transformer import MLATransformer
from parallel.collectives import group_size
from parallel.data import DataParallel, ZeroOptimizer
from parallel.pipeline import ModelParts, PipelineExecutor
from parallel.topology import Topology
from train.data.batch import TokenBatch


class ModelRunner:
    def __init__(
        self,
        parts: ModelParts | dict[int, MLATransformer],
        topology: Topology,
        *,
        micro_batch_size: int,
        num_microbatches: int,
        seq_len: int,
        precision: str,
        pp_schedule: str = "1f1b",
        virtual_stages: int = 1,
        bucket_cap_mb: float = 25.0,
        grad_sync: ZeroOptimizer | None = None,
    ) -> None:
        self.topology = topology
        self.parts = parts = ModelParts.of(parts)
        # Who averages the gradients over dp: a ZeroOptimizer (which then owns the reduction), or one
        # DataParallel wrapper per chunk. Both offer no_sync() and sync_gradients().
        if grad_sync is not None:
            self.grad_syncs = [grad_sync]
        else:
            # dense parameters averaged over the dp x cp replicas; experts (ep > 1) over the
            # expert-data-parallel group (parallel/data/data_parallel.py)
            experts = topology.edp_group if topology.ep_size > 1 else None
            self.grad_syncs = [
                DataParallel(c, topology.dp_cp_group, bucket_cap_mb, experts) for c in parts.chunks
            ]
        floats = (p for p in parts.parameters() if p.is_floating_point())
        self.param_dtype = next(floats).dtype  # activations between pipeline stages have it too
        self.mbs, self.m, self.seq_len = micro_batch_size, num_microbatches, seq_len
        self.precision = precision
        self.config = parts.first.config
        self.pipelined = topology.pp_size > 1 or len(parts) > 1
        self.pp_schedule, self.virtual_stages = pp_schedule, virtual_stages
        # under sequence parallelism the hidden states between stages are this rank's slice of the sequence
        self.sequence_shards = topology.tp_size if parts.first.sequence_parallel else 1
        self.executor = None
        if self.pipelined:
            self.executor = PipelineExecutor(parts, topology, pp_schedule, num_microbatches, virtual_stages)

    def set_micro_batches(self, micro_batch_size: int, num_microbatches: int) -> None:
        """Split each step's rows differently from now on (the same rows: the same loss and gradients)."""
        self.mbs, self.m = micro_batch_size, num_microbatches
        if self.pipelined:
            self.executor = PipelineExecutor(
                self.parts, self.topology, self.pp_schedule, num_microbatches, self.virtual_stages
            )

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.parts.parameters()

    def autocast(self):
        """bf16/fp16 matmuls; with 16-bit parameters (ZeRO mixed precision) the model is 16-bit anyway."""
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.topology.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def _no_sync(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for sync in self.grad_syncs:
            stack.enter_context(sync.no_sync())
        return stack

    def _activation_shape(self, batch: int, seq: int) -> tuple[int, int, int]:
        return (batch, seq, self.config.hidden_size)

    # ------------------------------------------------------------------ training

    def train_step(self, batch: TokenBatch | torch.Tensor, loss_scale: float = 1.0) -> torch.Tensor:
        """Forward and backward of this rank's slice of the global batch: a `TokenBatch`, or windows of
        (rows, seq_len + 1) tokens.

        The loss is the sum of the per-token losses over the global count of counted targets (`-100`
        excluded), whatever the split: micro-batch i of this rank, with n_i counted targets of N in the
        global batch, contributes mean_i / (N / (n_i * dp)), and dp averages the gradients. With equal
        counts that divisor is exactly the number of micro-batches, so unmasked runs are unchanged to the
        bit. Leaves dp-averaged gradients in `.grad` and returns this rank's loss share (zero on pipeline
        stages other than the last; `reduce_loss` combines the shares). Gradients are those of the loss
        times `loss_scale` (fp16 loss scaling); the returned loss is unscaled."""
        # Always `num_microbatches` equal micro-batches: under a sequence-length curriculum a step may
        # bring L / L_k times more rows of length L_k (tokens per micro-batch unchanged).
        masked = isinstance(batch, TokenBatch)
        batch = TokenBatch.of(batch).context_piece(self.topology.cp_rank, self.topology.cp_size)
        micro = batch.split(self.m)
        divisors = self._loss_divisors(micro, count_globally=masked)
        if not self.pipelined:
            model = self.parts.first
            total = torch.zeros((), device=batch.inputs.device)
            for i, mb in enumerate(micro):
                sync = contextlib.nullcontext() if i == len(micro) - 1 else self._no_sync()
                with sync, self.autocast():
                    with record_function("forward"):
                        loss = self._micro_batch_loss(model, mb, divisors[i], len(micro))
                    with record_function("backward"):
                        (loss * loss_scale).backward()
                total += loss.detach().float()
            return total
        with self._no_sync(), self.autocast():
            total = self.executor.step(
                [mb.inputs for mb in micro],
                [mb.targets for mb in micro],
                self._activation_shape(micro[0].rows, micro[0].inputs.shape[1] // self.sequence_shards),
                self.param_dtype,
                loss_scale=[loss_scale / d for d in divisors],
                extras=[mb.extras() for mb in micro],
            )
        for sync in self.grad_syncs:
            sync.sync_gradients()
        return total / loss_scale

    @staticmethod
    def _micro_batch_loss(model: MLATransformer, mb: TokenBatch, divisor: float, m: int) -> torch.Tensor:
        """Micro-batch i's share of the step's loss: its cross-entropy mean over n_i counted targets
        divided by d_i = N / (n_i dp), plus its MoE balance loss (a mean over its rows) divided by the m
        micro-batches, since every micro-batch holds the same share of the global batch's rows; dp then
        averages both. The balance loss is a mean over rows, not targets: weighing it by n_i, as the
        cross-entropy is, would make it depend on how masked rows are split. d_i = inf (n_i = 0): no
        cross-entropy, the balance loss alone."""
        if math.isinf(divisor):
            return model.loss(mb.inputs, mb.targets, balance_weight=1.0 / m, **mb.extras())
        return model.loss(mb.inputs, mb.targets, balance_weight=divisor / m, **mb.extras()) / divisor

    def _loss_divisors(self, micro: list[TokenBatch], count_globally: bool) -> list[float]:
        """N / (n_i * dp) per micro-batch (inf when n_i = 0: that micro-batch's mean is 0 anyway), with
        dp x cp for dp under context parallelism (each cp rank holds a part of every row).

        N, the counted targets of the global batch, is summed over dp (x cp) for masked batches; for plain
        windows every target counts, so N is known locally."""
        counts = [mb.counted() for mb in micro]
        dp = self.topology.dp_cp_size
        total = sum(counts) * dp
        if count_globally and dp > 1:
            n = torch.tensor([sum(counts)], dtype=torch.float64, device=micro[0].inputs.device)
            dist.all_reduce(n, group=self.topology.dp_cp_group)
            total = int(n.item())
        return [total / (c * dp) if c else float("inf") for c in counts]

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Sum the pipeline stages' shares (only the last is non-zero), then average over dp (x cp)."""
        loss = loss.clone()
        if group_size(self.topology.pp_group) > 1:
            dist.all_reduce(loss, group=self.topology.pp_group)
        if group_size(self.topology.dp_cp_group) > 1:
            dist.all_reduce(loss, group=self.topology.dp_cp_group)
            loss /= self.topology.dp_cp_size
        return loss

    # ------------------------------------------------------------------ evaluation and sampling

    def _train_mode(self, mode: bool) -> None:
        for chunk in self.parts.chunks:
            chunk.train(mode)

    @torch.no_grad()
    def evaluate(self, windows: np.ndarray | TokenBatch) -> float:
        """Mean next-token loss over the counted targets of the validation windows, split over dp (and
        each row over cp)."""
        topo = self.topology
        self._train_mode(False)
        data = TokenBatch.of(windows).context_piece(topo.cp_rank, topo.cp_size)
        bounds = np.array_split(np.arange(data.rows), topo.dp_size)[topo.dp_rank]
        start, stop = (int(bounds[0]), int(bounds[-1]) + 1) if len(bounds) else (0, 0)
        totals = torch.zeros(2, dtype=torch.float64, device=topo.device)
        batches = [
            data.select(i, min(i + self.mbs, stop)).to(topo.device) for i in range(start, stop, self.mbs)
        ]
        # Expert parallelism: every forward is an all-to-all over the ep group, so every rank runs as many
        # as dp rank 0 (the most rows); the extra ones, on a one-row batch, are not counted.
        first = -(-len(np.array_split(np.arange(data.rows), topo.dp_size)[0]) // self.mbs)
        padding = max(0, first - len(batches)) if topo.ep_size > 1 else 0
        dummies = [data.select(0, 1).to(topo.device) for _ in range(padding)]
        batches += dummies

        def add(batch: TokenBatch, chunk: MLATransformer, x: torch.Tensor) -> None:
            loss_sum = chunk.loss(x, batch.targets, reduction="sum", **batch.extras()).double()
            if any(batch is d for d in dummies):
                return
            count = torch.tensor(float(batch.counted()), dtype=torch.float64, device=topo.device)
            totals.add_(torch.stack([loss_sum, count]))

        with self.autocast():
            if self.pipelined:  # full batches in one pass, a smaller last batch in another
                for same in (
                    [b for b in batches if b.rows == self.mbs],
                    [b for b in batches if b.rows < self.mbs],
                ):
                    if same:
                        self.executor.forward_only(
                            [b.inputs for b in same],
                            self._activation_shape(same[0].rows, same[0].inputs.shape[1]),
                            self.param_dtype,
                            lambda i, chunk, x, same=same: add(same[i], chunk, x),
                            extras=[b.extras() for b in same],
                        )
            else:
                model = self.parts.first
                for b in batches:
                    add(b, model, b.inputs)
        for group in (topo.pp_group, topo.dp_cp_group):
            if group_size(group) > 1:
                dist.all_reduce(totals, group=group)
        self._train_mode(True)
        return (totals[0] / totals[1].clamp(min=1)).item()

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], new_tokens: int, seed: int) -> list[int]:
        """Sample with temperature 0.8 and top-k 40, recomputing the whole prefix for each token.

        Every rank of a TP group sees the same gathered logits and draws from the same generator; under
        pipeline parallelism the last stage samples and broadcasts the token to the other stages. Every
        cp rank runs the whole sequence (context parallelism is off while sampling)."""
        topo = self.topology
        self._train_mode(False)
        for chunk in self.parts.chunks:
            chunk.set_context_parallel(None)
        generator = torch.Generator().manual_seed(seed)
        ids = list(prompt_ids)
        token = torch.zeros(1, dtype=torch.long, device=topo.device)

        def sample(i: int, chunk: MLATransformer, x: torch.Tensor) -> None:
            logits = chunk(x, gather_output=True)[0, -1].float().cpu() / 0.8
            top = torch.topk(logits, k=min(40, logits.numel()))
            choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)
            token.fill_(int(top.indices[choice]))

        for _ in range(new_tokens):
            context = torch.tensor([ids[-self.config.max_seq_len :]], device=topo.device)
            with self.autocast():
                if self.pipelined:
                    self.executor.forward_only(
                        [context], self._activation_shape(1, context.shape[1]), self.param_dtype, sample
                    )
                    dist.broadcast(token, src=topo.pp_ranks[-1], group=topo.pp_group)
                else:
                    sample(0, self.parts.first, context)
            ids.append(int(token))
        for chunk in self.parts.chunks:
            chunk.set_context_parallel(topo.cp_group)
        self._train_mode(True)
        return ids
