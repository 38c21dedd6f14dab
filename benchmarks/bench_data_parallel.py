"""Our `parallel.DataParallel` against `torch.nn.parallel.DistributedDataParallel`, 2 ranks on gloo.

What is measured: the time of one training step (zero_grad, forward, cross-entropy, backward with the
gradient all-reduce, AdamW step) of the same `MLATransformer` (about 3.6 M parameters) on the same
per-rank batch, wrapped once in our DataParallel and once in torch DDP, at two bucket sizes (25 MB,
the default of both, and 1 MB). Buckets are what let the all-reduce of late layers' gradients overlap
the backward of earlier layers, so the small-bucket variant shows the overlap at work.

How: every variant owns its own copy of the model and optimizer, built from one seed, in the same two
processes. The steps are interleaved (ours, DDP, unsynchronised local step; then rotated) so drift of
this shared machine falls on each alike; each step is timed between barriers after warm-up (DDP
rebuilds its buckets after its first iteration), and the median is reported together with the ratio
ours / DDP (the goal is <= 1.0) three ways: the median of per-round ratios (the headline: robust to
drift), the ratio of medians and the ratio of minimums (noise on a shared machine only ever adds time).
The "local" column is the same step with no gradient synchronisation at all: what is left after
subtracting it is the communication that the backward pass did not hide.

Correctness: after the first backward (identical weights on both sides) the gradients of ours and of
DDP must agree to 1e-6 (fp32, one cross-rank sum), and so must the weights after the first AdamW step.

DDP runs with `forward_sync_buffers=False` (formerly `broadcast_buffers=False`): the model's only buffers
are constant RoPE tables, and our DataParallel does not re-broadcast buffers every forward either.

    python benchmarks/bench_data_parallel.py [--quick] [--json OUT]
"""

from __future__ import annotations

import copy
import statistics

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _common import (
    interleaved_times,
    markdown_table,
    paired_difference_ms,
    paired_ratio,
    parse_args,
    run_world,
    summary,
    write_json,
)
from torch.nn.parallel import DistributedDataParallel

from models import MLAConfig, MLATransformer
from parallel import DataParallel

CONFIG = dict(
    vocab_size=2048,
    hidden_size=256,
    num_layers=4,
    num_heads=4,
    kv_lora_rank=64,
    q_lora_rank=None,
    intermediate_size=688,
    max_seq_len=128,
)
BUCKET_CAPS_MB = (25.0, 1.0)
GRAD_TOLERANCE = 1e-6  # fp32; the only difference allowed is the order of one cross-rank sum


class Trainee:
    """A wrapped model, its AdamW and a fixed batch: `step()` is one full training step."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> None:
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.ids, self.targets = ids, targets

    def forward_backward(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(self.ids)
        F.cross_entropy(logits.flatten(0, 1), self.targets.flatten()).backward()

    def step(self) -> None:
        self.forward_backward()
        self.optimizer.step()


def inner(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DataParallel | DistributedDataParallel) else model


def max_difference(a: torch.nn.Module, b: torch.nn.Module, grads: bool) -> tuple[float, float]:
    """Largest absolute difference of grads (or weights) and the largest |value|, over all parameters."""
    worst, scale = 0.0, 0.0
    for (name, p), (name_b, q) in zip(inner(a).named_parameters(), inner(b).named_parameters(), strict=True):
        assert name == name_b, (name, name_b)
        x, y = (p.grad, q.grad) if grads else (p.detach(), q.detach())
        worst = max(worst, (x - y).abs().max().item())
        scale = max(scale, x.abs().max().item())
    return worst, scale


def ddp_bucket_count(ddp: DistributedDataParallel) -> int | None:
    data = ddp._get_ddp_logging_data()  # private, but the only place DDP reports its buckets
    sizes = data.get("rebuilt_bucket_sizes") or data.get("bucket_sizes")
    return len(str(sizes).split(",")) if sizes else None


def bench(rank: int, world_size: int, quick: bool) -> dict:
    group = dist.group.WORLD
    batch, seq = (4, 64) if quick else (8, 128)
    warmup, repeats = (2, 5) if quick else (3, 30)

    config = MLAConfig(**CONFIG)
    torch.manual_seed(0)
    base = MLATransformer(config)
    n_params = sum(p.numel() for p in base.parameters())
    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own slice of the batch
    ids = torch.randint(config.vocab_size, (batch, seq + 1), generator=generator)
    ids, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    flat = torch.zeros(n_params)  # the bare all-reduce of all gradients, as one flat buffer
    allreduce_s = interleaved_times({"all_reduce": lambda: dist.all_reduce(flat)}, warmup, repeats)[
        "all_reduce"
    ]

    results = []
    for cap in BUCKET_CAPS_MB:
        ours = Trainee(DataParallel(copy.deepcopy(base), group, bucket_cap_mb=cap), ids, targets)
        ddp_model = DistributedDataParallel(
            copy.deepcopy(base), process_group=group, bucket_cap_mb=cap, forward_sync_buffers=False
        )
        ddp = Trainee(ddp_model, ids, targets)
        local = Trainee(copy.deepcopy(base), ids, targets)

        ours.forward_backward()
        ddp.forward_backward()
        grad_diff, grad_scale = max_difference(ours.model, ddp.model, grads=True)
        ours.optimizer.step()
        ddp.optimizer.step()
        weight_diff, _ = max_difference(ours.model, ddp.model, grads=False)
        assert grad_diff <= GRAD_TOLERANCE * max(1.0, grad_scale), f"gradients differ by {grad_diff:.3g}"
        assert weight_diff <= GRAD_TOLERANCE, f"weights after one AdamW step differ by {weight_diff:.3g}"

        times = interleaved_times(
            {"ours": ours.step, "ddp": ddp.step, "local": local.step}, warmup, repeats, group
        )
        results.append(
            {
                "bucket_cap_mb": cap,
                "buckets_ours": len(ours.model.buckets),
                "buckets_ddp": ddp_bucket_count(ddp_model),
                "grad_max_abs_diff": grad_diff,
                "grad_max_abs": grad_scale,
                "weight_max_abs_diff_after_step": weight_diff,
                "ours": summary(times["ours"]),
                "ddp": summary(times["ddp"]),
                "local": summary(times["local"]),
                "ratio_of_medians": statistics.median(times["ours"]) / statistics.median(times["ddp"]),
                "median_paired_ratio": paired_ratio(times["ours"], times["ddp"]),
                "exposed_sync_ms_ours": paired_difference_ms(times["ours"], times["local"]),
                "exposed_sync_ms_ddp": paired_difference_ms(times["ddp"], times["local"]),
            }
        )
        del ours, ddp, ddp_model, local
    return {
        "config": CONFIG,
        "parameters": n_params,
        "gradient_mb": n_params * 4 / 2**20,
        "batch_per_rank": [batch, seq],
        "world_size": world_size,
        "warmup": warmup,
        "repeats": repeats,
        "flat_allreduce": summary(allreduce_s),
        "variants": results,
    }


def main() -> None:
    args = parse_args("bench_data_parallel", __doc__.splitlines()[0])
    result = run_world(bench, args.quick)
    batch, seq = result["batch_per_rank"]
    print(
        f"MLATransformer {result['parameters'] / 1e6:.2f} M parameters "
        f"({result['gradient_mb']:.1f} MB of fp32 gradients), batch {batch}x{seq} per rank, "
        f"{result['world_size']} ranks on gloo, {result['repeats']} interleaved rounds after "
        f"{result['warmup']} warm-up"
    )
    flat_ms = result["flat_allreduce"]["median_ms"]
    print(f"bare all-reduce of all gradients (one flat buffer): {flat_ms:.1f} ms\n")
    rows = []
    for v in result["variants"]:
        rows.append(
            [
                v["bucket_cap_mb"],
                f"{v['buckets_ours']} / {v['buckets_ddp']}",
                v["ours"]["median_ms"],
                v["ddp"]["median_ms"],
                v["local"]["median_ms"],
                f"{v['exposed_sync_ms_ours']:.1f} / {v['exposed_sync_ms_ddp']:.1f}",
                f"{v['median_paired_ratio']:.3f}",
                f"{v['ratio_of_medians']:.3f}",
                f"{v['ours']['min_ms'] / v['ddp']['min_ms']:.3f}",
                f"{v['grad_max_abs_diff']:.1e}",
            ]
        )
    headers = [
        "bucket MB",
        "buckets ours / DDP",
        "ours ms",
        "DDP ms",
        "local (no sync) ms",
        "exposed sync ms ours / DDP",
        "ours/DDP (paired)",
        "ours/DDP (medians)",
        "ours/DDP (min)",
        "max abs grad diff",
    ]
    print(markdown_table(headers, rows))
    for v in result["variants"]:
        print(
            f"\nbucket {v['bucket_cap_mb']:g} MB: gradients after one backward agree to "
            f"{v['grad_max_abs_diff']:.1e} (largest |grad| {v['grad_max_abs']:.2e}, tolerance "
            f"{GRAD_TOLERANCE:g}); weights after one AdamW step to {v['weight_max_abs_diff_after_step']:.1e}"
        )
    write_json(args.json, {"benchmark": "data_parallel", **result})


if __name__ == "__main__":
    main()
