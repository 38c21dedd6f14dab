"""The training loop: data, model, optimizer, schedule, accumulation, clipping, evaluation, logging.

One optimizer step consumes the global batch of that step (`train.global_batch_size` sequences, chosen
from (seed, step) alone). Each dp rank takes its contiguous slice and splits it into micro-batches of
`train.micro_batch_size`; the loss of a micro-batch is its mean token loss divided by the number of
micro-batches, so after the data-parallel average the gradient is that of the global-batch mean loss
whatever (dp, tp, micro_batch_size) is used — the loss curve is layout-independent up to floating-point
summation order.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from parallel.data import ZeroOptimizer
from parallel.grad_clip import clip_grad_norm_
from parallel.lowbit.lora import save_adapter
from parallel.lowbit.loss_scaler import DynamicLossScaler
from train.checkpointing import Checkpointer, restart_metrics
from train.config import Config, config_to_dict, dump_config
from train.context import RunContext
from train.data import BatchSampler, prepare_dataset, validation_windows
from train.faults import StepGuard, inject, set_collective_timeout
from train.flops import flops_per_token
from train.memory import detect_gpu
from train.monitor import MemoryMonitor, OOMRecovery, oom_explanation
from train.runner import ModelRunner
from train.setup import (  # noqa: F401 (re-exported: callers import them from here)
    NOT_YET,
    batch_shape_at,
    batch_split,
    build_model,
    build_optimizer,
    check_supported,
    lr_at,
    model_config,
    save_final_weights,
    uses_zero,
)


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train_once(config: Config, context: RunContext | None = None) -> dict:
    """Run one training job as configured; returns a summary (final losses, throughput, paths)."""
    check_supported(config)
    own_context = context is None
    context = context or RunContext.from_config(config)
    try:
        with StepGuard(context.topology, config.train.on_nonfinite) as guard:  # SIGTERM, NaN/inf
            return _train(config, context, guard)
    finally:
        if own_context:
            context.close()


def _train(config: Config, context: RunContext, guard: StepGuard) -> dict:
    topo, device, tc = context.topology, context.device, config.train
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    dataset = prepare_dataset(
        config.data.corpus,
        tokenizer=config.data.tokenizer,
        vocab_size=config.data.vocab_size,
        cache_dir=config.data.cache_dir,
        max_corpus_mb=config.data.max_corpus_mb,
        val_fraction=config.data.val_fraction,
        is_builder=topo.local_rank == 0,
        barrier=context.barrier,
        log=context.log,
    )
    mcfg = model_config(config, dataset)
    mbs, num_micro = batch_split(config, topo.dp_size)
    seq_len = config.data.seq_len
    sampler = BatchSampler(dataset.train_tokens, seq_len, tc.global_batch_size, tc.seed)
    val_windows = validation_windows(dataset.val_tokens, seq_len, tc.eval_batches * tc.global_batch_size)

    chunks = build_model(config, mcfg, topo)
    optimizer = build_optimizer(chunks, config, topo)
    zero = optimizer if isinstance(optimizer, ZeroOptimizer) else None
    scaler = DynamicLossScaler() if tc.precision == "fp16" else None
    runner = ModelRunner(
        chunks,
        topo,
        micro_batch_size=mbs,
        num_microbatches=num_micro,
        seq_len=seq_len,
        precision=tc.precision,
        pp_schedule=config.distributed.pp_schedule,
        virtual_stages=config.distributed.virtual_stages,
        bucket_cap_mb=config.distributed.bucket_cap_mb,
        grad_sync=zero,
    )

    out_dir = Path(tc.out_dir)
    resolved = replace(
        config,
        model={**mcfg.to_dict(), "pretrained": config.model.get("pretrained")},
        distributed=replace(config.distributed, dp=topo.dp_size, tp=topo.tp_size),
        train=replace(tc, micro_batch_size=mbs),
    )
    if context.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        dump_config(resolved, out_dir / "config.yaml")
    checkpoints = Checkpointer(config, resolved, context, chunks, optimizer, scaler)
    resumed = checkpoints.resume()  # model, optimizer, scaler and RNG as saved; None: a fresh start
    monitor = MemoryMonitor(device, tc.mem_warn_fraction)  # mem_* fields at every logged step
    recovery = OOMRecovery(runner, optimizer, context.log, lambda: oom_explanation(resolved, mcfg, topo))
    context.log(
        f"model: {mcfg.num_parameters() / 1e6:.2f}M parameters, vocab {mcfg.vocab_size}, "
        f"{mcfg.num_layers} layers; batch {tc.global_batch_size} x {seq_len} tokens = "
        f"{topo.dp_size} dp x {num_micro} micro-batches x {mbs}; {tc.steps} steps"
        + (
            f"; pipeline {config.distributed.pp_schedule} over {topo.pp_size} stages"
            if topo.pp_size > 1
            else ""
        )
        + (
            f"; sequence-length curriculum {tc.curriculum_start_seq_len} -> {seq_len} over "
            f"{tc.curriculum_steps} steps"
            if tc.curriculum_start_seq_len is not None
            else ""
        )
    )

    metrics_file = out_dir / "metrics.jsonl"

    def record(entry: dict) -> None:
        if context.is_main:
            finite = {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in entry.items()
            }
            with metrics_file.open("a") as f:  # strict JSON: a non-finite value is written as null
                f.write(json.dumps(finite) + "\n")

    curriculum = tc.curriculum_start_seq_len is not None
    peak_tflops = tc.peak_tflops  # for MFU: the config's, else the GPU preset's 16-bit dense peak
    if (
        peak_tflops is None
        and device.type == "cuda"
        and (gpu := detect_gpu(torch.cuda.get_device_name(device)))
    ):
        peak_tflops = gpu.peak_tflops
    start_step = done = resumed.step if resumed else 0
    tokens_done = tokens_at_last_log = resumed.tokens if resumed else 0
    stop_reason = None
    start = last_log_time = time.perf_counter()
    last_log_step = resumed.last_log_step if resumed else 0
    loss_sum = torch.zeros((), device=device)
    if resumed and resumed.loss_sum is not None:  # the same layout's logging window, exactly
        loss_sum.fill_(resumed.loss_sum)
    guard.skipped = list(resumed.skipped) if resumed else []
    history, val_history = restart_metrics(metrics_file, resumed, context.is_main)
    if resumed is None:
        initial = runner.evaluate(val_windows)
        val_history.append(
            {"step": 0, "split": "val", "loss": initial, "perplexity": math.exp(min(initial, 50))}
        )
        record(val_history[0])
        context.log(
            f"val_loss {initial:.4f} | val_ppl {val_history[0]['perplexity']:.2f} | step 0 (before training)"
        )
    start = last_log_time = time.perf_counter()
    for step in range(start_step, tc.steps):
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_len, step_rows = batch_shape_at(step, config)
        tokens_done += step_len * step_rows
        batch = torch.from_numpy(
            sampler.local_batch(step, topo.dp_rank, topo.dp_size, seq_len=step_len, batch_size=step_rows)
        )
        batch = batch.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else batch
        if scaler is None:  # out of memory: retried with smaller micro-batches (train/monitor.py)
            step_loss = recovery.train_step(step + 1, batch)
        else:
            step_loss = recovery.train_step(step + 1, batch, scaler.scale)
            zero.scale_grads(1.0 / scaler.scale)
        step_loss = inject(step + 1, step_loss, runner.parameters(), zero)  # MLA_FAULT_* (tests)
        if zero is not None:
            grad_norm = zero.clip_grad_norm_(tc.grad_clip, topo.tp_group, topo.pp_group)
        else:
            grad_norm = clip_grad_norm_(runner.parameters(), tc.grad_clip, topo.tp_group, topo.pp_group)
        if not guard.skip_step(step + 1, step_loss, grad_norm, check_grad_norm=scaler is None):
            loss_sum += step_loss
            if scaler is None or not scaler.update(grad_norm.item()):  # fp16: skip a step with inf/NaN grads
                optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        if step == start_step:
            set_collective_timeout(topo, config.distributed.timeout_s)  # start-up is over

        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            counted = done - last_log_step - guard.skipped_since(last_log_step)
            mean_loss = runner.reduce_loss(loss_sum).item() / counted if counted else math.nan
            now = time.perf_counter()
            tokens_per_s = (tokens_done - tokens_at_last_log) / (now - last_log_time)
            elapsed = now - start
            eta = elapsed / (done - start_step) * (tc.steps - done)
            entry = {
                "step": done,
                "loss": mean_loss,
                "lr": lr,
                "grad_norm": grad_norm.item(),
                "tokens_per_s": tokens_per_s,
                "tokens": tokens_done,
                "elapsed_s": elapsed,
            }
            if curriculum:
                entry["seq_len"] = step_len
            if scaler is not None:
                entry["loss_scale"], entry["skipped_steps"] = scaler.scale, scaler.skipped_steps
            if tc.on_nonfinite == "skip":
                entry["skipped_nonfinite"] = len(guard.skipped)
            tflops = tokens_per_s * flops_per_token(mcfg, step_len) / topo.world_size / 1e12
            entry["tflops_per_device"] = tflops
            if peak_tflops:
                entry["mfu"] = tflops / peak_tflops
            memory = monitor.sample()
            entry.update(memory)
            if recovery.retries:
                entry["micro_batch_size"], entry["oom_retries"] = runner.mbs, recovery.retries
            record(entry)
            history.append(entry)
            context.log(
                f"step {done:>6}/{tc.steps} | loss {mean_loss:.4f} | lr {lr:.2e} | grad-norm "
                f"{entry['grad_norm']:.3f} | {tokens_per_s:,.0f} tok/s | {tflops:.3g} TFLOP/s/device | "
                + (f"MFU {entry['mfu']:.1%} | " if "mfu" in entry else "")
                + f"{monitor.describe(memory)} | "
                + f"elapsed {_format_seconds(elapsed)} | eta {_format_seconds(eta)}"
            )
            if monitor.warning(memory):
                context.log(monitor.warning(memory))
            loss_sum.zero_()
            last_log_step, last_log_time, tokens_at_last_log = done, time.perf_counter(), tokens_done
            if tc.max_loss is not None and (not math.isfinite(mean_loss) or mean_loss > tc.max_loss):
                stop_reason = (
                    f"train loss {mean_loss:.4g} at step {done} is above train.max_loss={tc.max_loss}"
                )
                context.log(f"stopping: {stop_reason}")
                break
        if (tc.eval_every and done % tc.eval_every == 0) or done == tc.steps:
            eval_start = time.perf_counter()
            val_loss = runner.evaluate(val_windows)
            entry = {
                "step": done,
                "split": "val",
                "loss": val_loss,
                "perplexity": math.exp(min(val_loss, 50)),
            }
            record(entry)
            val_history.append(entry)
            context.log(f"val_loss {val_loss:.4f} | val_ppl {entry['perplexity']:.2f} | step {done}")
            last_log_time += time.perf_counter() - eval_start
        if checkpoints.due(done) or guard.stop_requested:
            checkpoints.save(done, tokens_done, loss_sum, last_log_step, guard.skipped)
        if guard.stop_requested:
            stop_reason = f"SIGTERM: stopped after step {done}, checkpoint saved"
            context.log(f"stopping: {stop_reason}")
            break

    if stop_reason is None and checkpoints.last_saved != done:
        checkpoints.save(done, tokens_done, loss_sum, last_log_step, guard.skipped)
    whole = (
        zero.sharding.gathered_parameters()
        if zero is not None and zero.sharding
        else contextlib.nullcontext()
    )
    with whole:  # ZeRO-3 keeps only shards between steps
        final_dir = save_final_weights(runner, mcfg, out_dir, context, dataset.tokenizer)
        if config.lora.enabled:
            adapter_dir = save_adapter(list(chunks.values()), out_dir / "adapter", topo.pp_group)
    context.log(f"saved final weights to {final_dir}")
    if config.lora.enabled:
        context.log(f"saved the LoRA adapter (PEFT format) to {adapter_dir}")
    sample = None
    if tc.sample_tokens and stop_reason is None:
        prompt = dataset.tokenizer.encode(tc.sample_prompt).ids or [dataset.eot_id]
        ids = runner.generate(prompt, tc.sample_tokens, tc.seed)
        sample = dataset.tokenizer.decode(ids)
        context.log("sample: " + json.dumps(sample))
    context.barrier()
    return {
        "final_loss": history[-1]["loss"] if history else None,
        "val_loss": val_history[-1]["loss"] if val_history else None,
        "val_perplexity": val_history[-1]["perplexity"] if val_history else None,
        "first_val_loss": val_history[0]["loss"] if val_history else None,
        "steps": tc.steps,
        "tokens": tokens_done,
        "stopped_early": stop_reason is not None,
        "stop_reason": stop_reason,
        "elapsed_s": time.perf_counter() - start,
        "out_dir": str(out_dir),
        "history": history,
        "val_history": val_history,
        "sample": sample,
        "config": config_to_dict(resolved),
    }
