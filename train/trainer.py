"""The training loop: one optimizer step per global batch, with logging, evaluation and checkpoints.

One optimizer step consumes the global batch of that step (`train.global_batch_size` sequences, chosen
from (seed, step) alone). Each dp rank takes its contiguous slice and splits it into micro-batches of
`train.micro_batch_size`; the loss of a micro-batch is its mean token loss divided by the number of
micro-batches, so after the data-parallel average the gradient is that of the global-batch mean loss
whatever (dp, tp, micro_batch_size) is used — the loss curve is layout-independent up to floating-point
summation order.

`Trainer(config, context, guard)` builds this rank's share of the run (data, layout, model parts,
optimizer, runner, checkpoints); `train()` runs the steps and returns the summary that `train_once`
returns. Tests may hand it a `train.faults.FaultPlan`; a run without one has no injection path. Trackers,
the step-time breakdown and profiler traces hook into the loop through `train.observability`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from models.moe import routing_statistics, update_router_bias
from parallel.data import ZeroOptimizer
from parallel.grad_clip import clip_grad_norm_
from parallel.lowbit.lora import save_adapter
from parallel.lowbit.loss_scaler import DynamicLossScaler
from train.build import build_model, build_optimizer, build_runner
from train.checkpointing import Checkpointer
from train.config import Config, config_to_dict, dump_config
from train.context import RunContext
from train.data.batch import TokenBatch
from train.data.loading import load_training_data
from train.data.tokenizer import resolve_tokenizer
from train.faults import FaultPlan, NonFiniteError, StepGuard, set_collective_timeout
from train.flops import flops_per_token
from train.hf_folder import write_hf_folder
from train.layout import Layout, check_tokens, ignored_settings, model_config
from train.metrics import MetricsLog, format_seconds, peak_tflops
from train.monitor import MemoryMonitor, OOMRecovery, oom_explanation
from train.observability import Observability
from train.rundir import claim_for_run, release
from train.schedules import batch_shape_at, lr_at
from train.watchdog import Watchdog


def train_once(config: Config, context: RunContext | None = None, *, faults: FaultPlan | None = None) -> dict:
    """Run one training job as configured; returns a summary (final losses, throughput, paths)."""
    # before any work, even the run folder: with a pretrained model, its own tokenizer (or an error)
    pretrained = config.model.get("pretrained")
    tokenizer = resolve_tokenizer(config.data.tokenizer, pretrained)
    config = replace(config, data=replace(config.data, tokenizer=tokenizer))
    own_context = context is None
    context = context or RunContext.from_config(config)
    lock, watchdog, tc = None, None, config.train
    try:
        lock = claim_for_run(config, context)  # out_dir: ours alone, before any expensive work
        watchdog = Watchdog(context.rank, config.distributed.startup_timeout_s)  # names the rank on a hang
        with StepGuard(context.topology, tc.on_nonfinite, tc.max_skipped_steps, tc.steps) as guard:
            return Trainer(config, context, guard, faults, watchdog).train()
    finally:
        release(lock)
        if watchdog is not None:
            watchdog.close()
        if own_context:
            context.close()


class Trainer:
    """One training job on this rank: built from the config, run to the end by `train()`."""

    def __init__(
        self,
        config: Config,
        context: RunContext,
        guard: StepGuard,
        faults: FaultPlan | None = None,
        watchdog: Watchdog | None = None,
    ) -> None:
        self.config, self.context, self.guard, self.faults = config, context, guard, faults
        self.watchdog = watchdog
        topo, tc = context.topology, config.train
        random.seed(tc.seed)
        np.random.seed(tc.seed)
        data = load_training_data(config, topo.local_rank == 0, context.barrier, context.log)
        self.dataset, self.sampler, self.val_windows = data.dataset, data.sampler, data.validation
        self.mcfg = model_config(config, self.dataset.vocab_size)
        self.layout = Layout.resolve(config, self.mcfg, topo.dp_size, topo.tp_size)
        check_tokens(self.mcfg, self.dataset)
        for note in ignored_settings(config, topo.tp_size, self.dataset.vocab_size):
            context.log(f"warning: {note}")
        self.parts = build_model(config, self.mcfg, topo)
        self.optimizer = build_optimizer(self.parts, config, topo)
        self.zero = self.optimizer if isinstance(self.optimizer, ZeroOptimizer) else None
        self.scaler = DynamicLossScaler() if tc.precision == "fp16" else None
        self.runner = build_runner(self.parts, self.layout, topo, self.optimizer)
        self.out_dir = Path(tc.out_dir)
        resolved = self.layout.config
        self.checkpoints = Checkpointer(
            config, resolved, context, self.parts, self.optimizer, self.scaler, faults
        )
        self.checkpoints.tokenizer_sha256 = hashlib.sha256(
            self.dataset.tokenizer.to_str().encode()
        ).hexdigest()
        self.resumed = self.checkpoints.resume()  # model, optimizer, scaler and RNG as saved; None: fresh
        if context.is_main:  # only once the start is sure: a refused resume leaves config.yaml as it was
            dump_config(resolved, self.out_dir / "config.yaml")
        self.monitor = MemoryMonitor(context.device, tc.mem_warn_fraction)  # mem_* fields when logging
        self.recovery = OOMRecovery(
            self.runner,
            self.optimizer,
            context.log,
            lambda: oom_explanation(resolved, self.mcfg, topo),
            faults,
        )
        context.log(self._describe())
        self.watch = Observability(config, resolved, context, self.resumed)  # trackers, timing, profiler
        self._restore_counters()

    def _phase(self, label: str) -> None:
        """Tell the hang watchdog (train/watchdog.py) what this rank does now."""
        if self.watchdog is not None:
            self.watchdog.phase(label)

    def _describe(self) -> str:
        tc, topo, mcfg, layout = self.config.train, self.context.topology, self.mcfg, self.layout
        text = (
            f"model: {mcfg.num_parameters() / 1e6:.2f}M parameters, vocab {mcfg.vocab_size}, "
            f"{mcfg.num_layers} layers; batch {tc.global_batch_size} x {self.config.data.seq_len} tokens = "
            f"{topo.dp_size} dp x {layout.num_microbatches} micro-batches x {layout.micro_batch_size}; "
            f"{tc.steps} steps"
        )
        if topo.pp_size > 1:
            text += f"; pipeline {self.config.distributed.pp_schedule} over {topo.pp_size} stages"
        if tc.curriculum_start_seq_len is not None:
            text += (
                f"; sequence-length curriculum {tc.curriculum_start_seq_len} -> {self.config.data.seq_len} "
                f"over {tc.curriculum_steps} steps"
            )
        return text

    def _restore_counters(self) -> None:
        """Step, tokens and logging window: the resumed checkpoint's, or zero."""
        resumed, device = self.resumed, self.context.device
        self.start_step = self.done = resumed.step if resumed else 0
        self.tokens_done = self.tokens_at_last_log = resumed.tokens if resumed else 0
        self.last_log_step = resumed.last_log_step if resumed else 0
        self.stop_reason: str | None = None
        self.loss_sum = torch.zeros((), device=device)
        if resumed and resumed.loss_sum is not None:  # the same layout's logging window, exactly
            self.loss_sum.fill_(resumed.loss_sum)
        self.guard.skipped = list(resumed.skipped) if resumed else []
        self.metrics = MetricsLog(
            self.out_dir / "metrics.jsonl", self.context.is_main, resumed, self.watch.trackers.log
        )
        self.peak_tflops = peak_tflops(self.config.train.peak_tflops, device)

    def train(self) -> dict:
        """Run the remaining steps, then save and summarise (see `finish`)."""
        tc = self.config.train
        if self.resumed is None:
            self.evaluate(0)
        self.start = self.last_log_time = time.perf_counter()
        for step in range(self.start_step, tc.steps):
            self.watch.profiler.before_step(step + 1)
            logged = (step + 1) % tc.log_every == 0 or step + 1 == tc.steps
            with self.watch.timer.step(logged):
                lr, step_len, grad_norm = self.step(step)
            self.done = done = step + 1
            if logged and not self.log(lr, step_len, grad_norm):
                break
            if (tc.eval_every and done % tc.eval_every == 0) or done == tc.steps:
                self.evaluate(done)
            if self.checkpoints.due(done) or self.guard.stop_requested:
                with self.watch.timer.checkpoint():
                    self.save()
            self.watch.profiler.after_step(done)
            if self.guard.stop_requested:
                self._stop(f"{self.guard.stop_signal}: stopped after step {done}, checkpoint saved")
                break
        return self.finish()

    def step(self, step: int) -> tuple[float, int, torch.Tensor]:
        """Optimizer step `step` (0-based): forward, backward, clipping, update. Returns (lr, sequence
        length, gradient norm)."""
        config, topo, device = self.config, self.context.topology, self.context.device
        self.watch.timer.switch("data")
        lr = lr_at(step, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        step_len, step_rows = batch_shape_at(step, config)
        self.tokens_done += step_len * step_rows
        rows = self.sampler.local_batch(
            step, topo.dp_rank, topo.dp_size, seq_len=step_len, batch_size=step_rows
        )
        if isinstance(rows, TokenBatch):  # ignored targets and document ids (train/data/packing.py)
            batch = rows.to(device)
        else:
            batch = torch.from_numpy(rows)
            batch = batch.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else batch
        self.watch.timer.switch("compute")
        self._phase(f"step {step + 1}: forward and backward (tp/pp/dp collectives inside)")
        if self.scaler is None:  # out of memory: retried with smaller micro-batches (train/monitor.py)
            loss = self.recovery.train_step(step + 1, batch)
        else:
            loss = self.recovery.train_step(step + 1, batch, self.scaler.scale)
            self.zero.scale_grads(1.0 / self.scaler.scale)
        if self.faults is not None:
            loss = self.faults.after_backward(step + 1, loss, self.runner.parameters(), self.zero)
        self.watch.timer.switch("optimizer")
        clip = config.train.grad_clip
        self._phase(f"step {step + 1}: gradient norm (all-reduce over tp/pp/dp)")
        if self.zero is not None:
            grad_norm = self.zero.clip_grad_norm_(clip, topo.tp_group, topo.pp_group, topo.ep_group)
        else:
            grad_norm = clip_grad_norm_(
                self.runner.parameters(), clip, topo.tp_group, topo.pp_group, topo.ep_group
            )
        self._phase(f"step {step + 1}: non-finite and signal check (all-reduce over the world)")
        if not self.guard.skip_step(step + 1, loss, grad_norm, check_grad_norm=self.scaler is None):
            self._phase(f"step {step + 1}: optimizer step (ZeRO all-gather inside)")
            self.loss_sum += loss
            # fp16: the scaler skips a step with inf/NaN gradients
            if self.scaler is None or not self.scaler.update(grad_norm.item()):
                self.optimizer.step()
                if self.mcfg.router_bias_update_rate:
                    update_router_bias(self.parts.chunks, self.mcfg.router_bias_update_rate, topo.dp_group)
        self.optimizer.zero_grad(set_to_none=False)
        self._phase(f"after step {step + 1}: logging, validation or checkpoint (collectives inside)")
        if step == self.start_step:
            set_collective_timeout(topo, config.distributed.timeout_s)  # start-up is over
            if self.watchdog is not None:
                self.watchdog.limit(config.distributed.timeout_s)
        return lr, step_len, grad_norm

    def _record(self, lr: float, step_len: int, grad_norm: torch.Tensor) -> dict:
        """The training record of the logging window that ends at step `self.done`."""
        tc, topo, done = self.config.train, self.context.topology, self.done
        counted = done - self.last_log_step - self.guard.skipped_since(self.last_log_step)
        mean_loss = self.runner.reduce_loss(self.loss_sum).item() / counted if counted else math.nan
        now = time.perf_counter()
        tokens_per_s = (self.tokens_done - self.tokens_at_last_log) / (now - self.last_log_time)
        entry = {
            "step": done,
            "loss": mean_loss,
            "lr": lr,
            "grad_norm": grad_norm.item(),
            "tokens_per_s": tokens_per_s,
            "tokens": self.tokens_done,
            "elapsed_s": now - self.start,
        }
        if tc.curriculum_start_seq_len is not None:
            entry["seq_len"] = step_len
        if self.scaler is not None:
            entry["loss_scale"], entry["skipped_steps"] = self.scaler.scale, self.scaler.skipped_steps
        if tc.on_nonfinite == "skip":
            entry["skipped_nonfinite"] = len(self.guard.skipped)
        tflops = tokens_per_s * flops_per_token(self.mcfg, step_len) / topo.world_size / 1e12
        entry["tflops_per_device"] = tflops
        if self.peak_tflops:
            entry["mfu"] = tflops / self.peak_tflops
        if self.mcfg.is_moe:
            entry.update(routing_statistics(self.parts.chunks, topo.dp_group, topo.pp_group))
        entry.update(self.monitor.sample())
        entry.update(self.watch.timer.record())
        if self.recovery.retries:
            entry["micro_batch_size"], entry["oom_retries"] = self.runner.mbs, self.recovery.retries
        return entry

    def log(self, lr: float, step_len: int, grad_norm: torch.Tensor) -> bool:
        """Write and print the record of the window ending at `self.done`; False when `train.max_loss`
        stops the run."""
        tc, done = self.config.train, self.done
        entry = self._record(lr, step_len, grad_norm)
        self.metrics.add(entry)
        eta = entry["elapsed_s"] / (done - self.start_step) * (tc.steps - done)
        self.context.log(
            f"step {done:>6}/{tc.steps} | loss {entry['loss']:.4f} | lr {lr:.2e} | grad-norm "
            f"{entry['grad_norm']:.3f} | {entry['tokens_per_s']:,.0f} tok/s | "
            f"{entry['tflops_per_device']:.3g} TFLOP/s/device | "
            + (f"MFU {entry['mfu']:.1%} | " if "mfu" in entry else "")
            + f"{self.monitor.describe(entry)} | "
            + f"elapsed {format_seconds(entry['elapsed_s'])} | eta {format_seconds(eta)}"
        )
        if self.monitor.warning(entry):
            self.context.log(self.monitor.warning(entry))
        self.loss_sum.zero_()
        self.last_log_step, self.last_log_time, self.tokens_at_last_log = (
            done,
            time.perf_counter(),
            self.tokens_done,
        )
        mean_loss = entry["loss"]
        if tc.max_loss is not None and (not math.isfinite(mean_loss) or mean_loss > tc.max_loss):
            self._stop(f"train loss {mean_loss:.4g} at step {done} is above train.max_loss={tc.max_loss}")
            return False
        return True

    def _stop(self, reason: str) -> None:
        self.stop_reason = reason
        self.context.log(f"stopping: {reason}")

    def evaluate(self, step: int) -> None:
        """Validation loss after `step` steps (0: before training); its time is not training time."""
        eval_start = time.perf_counter()
        val_loss = self.runner.evaluate(self.val_windows)
        entry = {"step": step, "split": "val", "loss": val_loss, "perplexity": math.exp(min(val_loss, 50))}
        self.metrics.add(entry)
        when = f"step {step}" + (" (before training)" if step == 0 else "")
        self.context.log(f"val_loss {val_loss:.4f} | val_ppl {entry['perplexity']:.2f} | {when}")
        if step:
            self.last_log_time += time.perf_counter() - eval_start

    def save(self) -> None:
        """A checkpoint of the state after `self.done` steps. Collective."""
        self.checkpoints.save(
            self.done,
            self.tokens_done,
            self.loss_sum,
            self.last_log_step,
            self.guard.skipped,
            self.watch.trackers.run_id,
        )

    def finish(self) -> dict:
        """The last checkpoint, the final weights (and LoRA adapter), a sample, and the run's summary."""
        context, out_dir, zero = self.context, self.out_dir, self.zero
        if self.stop_reason is None and self.checkpoints.last_saved != self.done:
            self.save()
        self.checkpoints.wait()
        self.watch.close()
        last_val = self.metrics.val_history[-1] if self.metrics.val_history else None
        if last_val is not None and not math.isfinite(last_val["loss"]):
            raise NonFiniteError(
                f"validation loss {last_val['loss']} at step {last_val['step']}: the model is broken, "
                f"final/ not written (checkpoints: {self.checkpoints.root})"
            )
        whole = zero.sharding.gathered_parameters() if zero is not None and zero.sharding else None
        with whole or contextlib.nullcontext():  # ZeRO-3 keeps only shards between steps
            final_dir = write_hf_folder(
                self.parts,
                out_dir / "final",
                self.layout.config,
                self.dataset.tokenizer_file,
                context.topology.pp_group,
                context.topology.ep_group,
            )
            if self.config.lora.enabled:
                adapter_dir = save_adapter(
                    self.parts.chunks,
                    out_dir / "adapter",
                    context.topology.pp_group,
                    self.config.model.get("pretrained"),
                    context.topology.ep_group,
                )
        context.log(f"saved final weights to {final_dir}")
        if self.config.lora.enabled:
            context.log(f"saved the LoRA adapter (PEFT format) to {adapter_dir}")
        sample = self._sample() if self.config.train.sample_tokens and self.stop_reason is None else None
        context.barrier()
        history, val_history = self.metrics.history, self.metrics.val_history
        return {
            "final_loss": history[-1]["loss"] if history else None,
            "val_loss": val_history[-1]["loss"] if val_history else None,
            "val_perplexity": val_history[-1]["perplexity"] if val_history else None,
            "first_val_loss": val_history[0]["loss"] if val_history else None,
            "steps": self.config.train.steps,
            "tokens": self.tokens_done,
            "stopped_early": self.stop_reason is not None,
            "stop_reason": self.stop_reason,
            "elapsed_s": time.perf_counter() - self.start,
            "out_dir": str(out_dir),
            "history": history,
            "val_history": val_history,
            "sample": sample,
            "config": config_to_dict(self.layout.config),
        }

    def _sample(self) -> str:
        tc, tokenizer = self.config.train, self.dataset.tokenizer
        head = [] if self.dataset.bos_id is None else [self.dataset.bos_id]  # as documents start
        prompt = head + tokenizer.encode(tc.sample_prompt, add_special_tokens=False).ids or [
            self.dataset.eot_id
        ]
        sample = tokenizer.decode(self.runner.generate(prompt, tc.sample_tokens, tc.seed))
        self.context.log("sample: " + json.dumps(sample))
        return sample
