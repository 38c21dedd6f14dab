"""Training time blocked by a checkpoint save: synchronous `checkpoint.save` vs `checkpoint.save_async`.

    python benchmarks/bench_async_save.py [--quick] [--json OUT]

One process, an MLA model with fp32 AdamW state (params + two moments, the checkpoint's bulk). Each
round, interleaved: (a) a synchronous save, timed from call to return; (b) an asynchronous save, timed
from call to return (the copy to host memory), after which training steps run while the background
thread writes, until it has committed; (c) as many steps with no save in flight, the baseline. The cost
of an asynchronous save to training is its blocked time plus what the overlapped steps lost to the
writer (CPU and memory bandwidth it shares with them): blocked + sum(overlapped) - sum(baseline). Both
costs are reported as ratios to the synchronous save of the same round.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import markdown_table, parse_args, summary, write_json

from models.config import MLAConfig
from models.transformer import MLATransformer
from parallel import checkpoint

CONFIG = dict(
    vocab_size=8192,
    hidden_size=512,
    num_layers=6,
    num_heads=8,
    kv_lora_rank=128,
    q_lora_rank=None,
    intermediate_size=1376,
    max_seq_len=64,
)
QUICK = dict(CONFIG, hidden_size=128, num_layers=2, num_heads=4, kv_lora_rank=32, intermediate_size=344)


def main() -> None:
    args = parse_args("bench_async_save", __doc__)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = MLAConfig(**(QUICK if args.quick else CONFIG))
    model = MLATransformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, config.vocab_size, (2, 33))

    def train_step() -> float:
        start = time.perf_counter()
        model.loss(batch[:, :-1], batch[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    train_step()  # AdamW state exists from here on
    rounds = 2 if args.quick else 5
    rows = {"sync_blocked": [], "async_blocked": [], "async_cost": [], "write_total": []}
    overlapped_steps, baseline_steps = [], []
    root = Path(tempfile.mkdtemp(prefix="bench-async-save-"))
    try:
        train_step()
        for i in range(rounds):
            start = time.perf_counter()
            checkpoint.save(root / f"sync-{i}", model, optimizer, step=i)
            rows["sync_blocked"].append(time.perf_counter() - start)
            start = time.perf_counter()
            pending = checkpoint.save_async(root / f"async-{i}", model, optimizer, step=i)
            blocked = time.perf_counter() - start
            overlapped = []
            while not pending.done() or not overlapped:
                overlapped.append(train_step())
            pending.wait()
            rows["write_total"].append(time.perf_counter() - start)
            baseline = [train_step() for _ in overlapped]
            rows["async_blocked"].append(blocked)
            rows["async_cost"].append(blocked + sum(overlapped) - sum(baseline))
            overlapped_steps += overlapped
            baseline_steps += baseline
            for name in (f"sync-{i}", f"async-{i}"):
                shutil.rmtree(root / name)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    size = sum(p.numel() for p in model.parameters())
    result = {
        "config": CONFIG if not args.quick else QUICK,
        "parameters": size,
        "checkpoint_mb": size * 12 / 2**20,
        "rounds": rounds,
        **{name: summary(values) for name, values in rows.items()},
        "overlapped_step": summary(overlapped_steps),
        "baseline_step": summary(baseline_steps),
        "blocked_ratio_async_over_sync": statistics.median(
            a / s for a, s in zip(rows["async_blocked"], rows["sync_blocked"], strict=True)
        ),
        "cost_ratio_async_over_sync": statistics.median(
            a / s for a, s in zip(rows["async_cost"], rows["sync_blocked"], strict=True)
        ),
    }
    print(
        markdown_table(
            ["measure", "median ms", "ratio to the synchronous save"],
            [
                ["synchronous save: training blocked", result["sync_blocked"]["median_ms"], 1.0],
                [
                    "asynchronous save: training blocked",
                    result["async_blocked"]["median_ms"],
                    result["blocked_ratio_async_over_sync"],
                ],
                [
                    "asynchronous save: blocked + slowdown of overlapped steps",
                    result["async_cost"]["median_ms"],
                    result["cost_ratio_async_over_sync"],
                ],
                ["asynchronous save: call to commit", result["write_total"]["median_ms"], ""],
                ["training step, writer running", result["overlapped_step"]["median_ms"], ""],
                ["training step, no save in flight", result["baseline_step"]["median_ms"], ""],
            ],
        )
    )
    write_json(args.json, result)


if __name__ == "__main__":
    main()
