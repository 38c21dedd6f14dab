"""ZeRO (`parallel.ZeroOptimizer`, stages 0-3): per-rank memory against the formulas, step time on gloo.

Memory: one training step (forward, cross-entropy, backward, AdamW step) of an `MLATransformer` (about
3.6 M parameters) with a ZeroOptimizer of each stage, at dp 2 and dp 4, with fp32 parameters and with
bf16 parameters (mixed precision: fp32 master weights in the optimizer). After the step, the live
tensors are counted on every rank: the model's parameters and their `.grad`, the optimizer's fp32
`masters` and their `.grad`, the inner AdamW's `state` tensors, the buckets' fp32 `grad` buffers (and
reduce-scatter `shard`s) and, for stage 3, each bucket's `param_chunk`. Each storage is counted once
(de-duplicated by `untyped_storage().data_ptr()`), at its full `nbytes()`. The measured bytes per
parameter are compared with

- ours: the formula derived from the implementation. Gradients are accumulated in fp32 (the issue asks
  for it): a full fp32 bucket per rank at stages 0/1, freed after the reduction at stages 2/3, plus the
  fp32 gradient of the owned chunk (`master.grad`, 4/N); fp32 master 4/N; AdamW m and v 8/N; parameters
  2 (bf16) or 4 (fp32) bytes, and /N at stage 3. In fp32 the master is an extra copy of the weights.
  Stage 0 keeps the master, its gradient and the state whole (N = 1 in those three terms).
- the ZeRO paper's (Rajbhandari et al. 2020, mixed precision with Adam, K = 12): 2 + 2 + 12 = 16,
  4 + 12/N, 2 + 14/N, 16/N bytes per parameter for stages 0-3; its fp32 equivalent (no master copy,
  K = 8: fp32 momentum and variance): 16, 8 + 8/N, 4 + 12/N, 16/N.

The exact byte count expected from the bucket layout (buckets padded to a multiple of N, one 4-byte
AdamW `step` tensor per master) is checked to equal the measurement; the per-parameter formulas above
ignore the padding and the step tensors.

Step time: dp = 2 on gloo, fp32, forward + backward + step of the same model on the same per-rank
batch for DDP + AdamW, DDP + torch's `ZeroRedundancyOptimizer(AdamW)` and ours at stages 0-3 (ours does
not wrap the model: the optimizer's hooks reduce the gradients). Every variant owns its own copy of the
model, built from one seed, in the same two processes; rounds are interleaved and rotated, each step is
timed between barriers after warm-up, and the headline is the median of per-round ratios. First, every
variant takes one step from the same weights and the loss after it must agree with DDP + AdamW. Two
batch sizes: 8x128 tokens per rank (compute-bound) and 2x32 (communication weighs more).

The models' parameters carry `tp_dim` tags even at tp = 1, and ZeroOptimizer starts a new bucket
wherever the tag changes (sharded and replicated parameters are kept apart for the gradient norm), so
this model gets 27 buckets instead of 1 at the default 25 MB cap. One more variant, stage 1 with the
tags removed (1 bucket), shows what that split costs. The bare all-reduce, reduce-scatter and
all-gather of one flat fp32 buffer of all parameters are timed too: stages 2-3 all-reduce on gloo.

    python benchmarks/bench_zero.py [--quick] [--json OUT]
"""

from __future__ import annotations

import statistics
import subprocess

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _common import (
    REPO_ROOT,
    interleaved_times,
    markdown_table,
    paired_ratio,
    parse_args,
    run_world,
    summary,
    write_json,
)
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from models import MLAConfig, MLATransformer
from parallel.data import ZeroOptimizer
from parallel.data.zero3 import default_units

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
ADAM = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
STAGES = (0, 1, 2, 3)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
DP_SIZES = (2, 4)
LOSS_TOLERANCE = 1e-5  # fp32: the same element-wise AdamW on the same averaged gradient
CATEGORIES = ("params", "grads", "master", "optim_state")
UNTAGGED = "ours stage 1, tp tags removed"


# ---------------------------------------------------------------------------------------------- formulas


def ours_bytes_per_param(stage: int, n: int, param_bytes: int) -> dict[str, float]:
    """Bytes per parameter of our implementation by category (padding and step scalars ignored)."""
    shards = 1 if stage == 0 else n  # stage 0 keeps the master and the optimizer state whole
    return {
        "params": param_bytes / n if stage == 3 else param_bytes,
        # the full fp32 bucket (stages 0/1) + the fp32 gradient of the owned chunk (`master.grad`)
        "grads": (4.0 if stage < 2 else 0.0) + 4 / shards,
        "master": 0.0 if stage == 3 and param_bytes == 4 else 4 / shards,  # fp32 stage 3 shares the shard
        "optim_state": 8 / shards,
    }


def paper_bytes_per_param(stage: int, n: int, precision: str) -> float:
    """The ZeRO paper's bytes per parameter with Adam: mixed precision K = 12; fp32 K = 8, no master."""
    if precision == "bf16":
        return [16.0, 4 + 12 / n, 2 + 14 / n, 16 / n][stage]
    return [16.0, 8 + 8 / n, 4 + 12 / n, 16 / n][stage]


# ---------------------------------------------------------------------------------------------- memory


def live_bytes(model: torch.nn.Module, opt: ZeroOptimizer) -> dict[str, int]:
    """Bytes of the live tensors by category, each storage counted once, at its full size."""
    seen: set[int] = set()
    found = dict.fromkeys(CATEGORIES, 0)

    def add(category: str, tensor: torch.Tensor | None) -> None:
        if not torch.is_tensor(tensor):
            return
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in seen:
            return
        seen.add(storage.data_ptr())
        found[category] += storage.nbytes()

    for p in model.parameters():
        add("params", p)
        add("grads", p.grad)
    for bucket in opt.buckets:
        add("params", getattr(bucket, "param_chunk", None))  # stage 3: this rank's chunk of the weights
        add("grads", bucket.grad)
        add("grads", bucket.shard)
    for master in opt.masters:
        add("master", master)
        add("grads", master.grad)
    for state in opt.inner.state.values():
        for value in state.values():
            add("optim_state", value)
    return found


def expected_bytes(opt: ZeroOptimizer, stage: int, param_bytes: int, n_params: int) -> dict[str, int]:
    """The exact count the bucket layout implies: padded buckets, one fp32 `step` per master."""
    padded = sum(b.padded for b in opt.buckets)
    chunk = sum(b.chunk for b in opt.buckets)
    return {
        "params": (chunk if stage == 3 else n_params) * param_bytes,
        "grads": (padded * 4 if stage < 2 else 0) + chunk * 4,
        "master": 0 if stage == 3 and param_bytes == 4 else chunk * 4,  # fp32 stage 3: the shard itself
        "optim_state": chunk * 8 + 4 * len(opt.masters),
    }


def memory(rank: int, world_size: int, quick: bool) -> dict:
    group = dist.group.WORLD
    config = MLAConfig(**CONFIG)
    batch, seq = (2, 16) if quick else (4, 64)
    generator = torch.Generator().manual_seed(1000 + rank)
    ids = torch.randint(config.vocab_size, (batch, seq + 1), generator=generator)
    rows = []
    for precision, dtype in PRECISIONS.items():
        for stage in STAGES:
            torch.manual_seed(0)
            model = MLATransformer(config).to(dtype)
            n_params = sum(p.numel() for p in model.parameters())
            units = default_units(model) if stage == 3 else None
            opt = ZeroOptimizer(model.parameters(), torch.optim.AdamW, stage, group, units=units, **ADAM)
            opt.zero_grad()
            logits = model(ids[:, :-1])
            F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
            opt.step()
            del logits
            measured = live_bytes(model, opt)
            param_bytes = dtype.itemsize
            exact = expected_bytes(opt, stage, param_bytes, n_params)
            totals = torch.tensor([float(sum(measured.values()))])
            every_rank = [torch.zeros(1) for _ in range(world_size)]
            dist.all_gather(every_rank, totals, group=group)
            formula = ours_bytes_per_param(stage, world_size, param_bytes)
            rows.append(
                {
                    "dp": world_size,
                    "precision": precision,
                    "stage": stage,
                    "parameters": n_params,
                    "buckets": len(opt.buckets),
                    "padding_elements": sum(b.padded - b.numel for b in opt.buckets),
                    "measured_bytes": measured,
                    "expected_bytes_exact": exact,
                    "exact_match": measured == exact,
                    "total_bytes_every_rank": [int(t.item()) for t in every_rank],
                    "measured_per_param": {k: v / n_params for k, v in measured.items()},
                    "measured_per_param_total": sum(measured.values()) / n_params,
                    "ours_formula_per_param": formula,
                    "ours_formula_per_param_total": sum(formula.values()),
                    "paper_per_param": paper_bytes_per_param(stage, world_size, precision),
                }
            )
            del model, opt
    return {"rows": rows, "batch_per_rank": [batch, seq]}


# ---------------------------------------------------------------------------------------------- time


class Variant:
    """A model, its optimizer and a fixed batch: `step()` is one full training step."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> None:
        self.model, self.opt = model, opt
        self.set_batch(ids)

    def set_batch(self, ids: torch.Tensor) -> None:
        self.ids, self.targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def loss(self) -> torch.Tensor:
        logits = self.model(self.ids)
        return F.cross_entropy(logits.flatten(0, 1), self.targets.flatten())

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss().backward()
        self.opt.step()

    @torch.no_grad()
    def mean_loss(self) -> float:
        """The loss averaged over the dp ranks (each rank has its own batch)."""
        value = self.loss().detach().reshape(1)
        dist.all_reduce(value)
        return value.item() / dist.get_world_size()


def step_time(rank: int, world_size: int, quick: bool) -> dict:
    group = dist.group.WORLD
    shapes = [(2, 32)] if quick else [(8, 128), (2, 32)]
    warmup = 1 if quick else 3
    rounds = {(2, 32): 4} if quick else {(8, 128): 25, (2, 32): 60}  # the small batch is noisier
    config = MLAConfig(**CONFIG)
    generator = torch.Generator().manual_seed(1000 + rank)
    batches = [torch.randint(config.vocab_size, (b, s + 1), generator=generator) for b, s in shapes]

    def fresh() -> MLATransformer:
        # Built, not deep-copied: `copy.deepcopy` drops the `tp_dim` tags of the parameters, which
        # ZeroOptimizer's bucketing reads. The initialisation depends only on the seed.
        torch.manual_seed(0)
        return MLATransformer(config)

    def ddp() -> DistributedDataParallel:
        return DistributedDataParallel(fresh(), process_group=group, forward_sync_buffers=False)

    def ours(stage: int, untag: bool = False) -> Variant:
        model = fresh()
        if untag:  # at tp = 1 the tags carry no information; without them the buckets are not split
            for p in model.parameters():
                p.__dict__.pop("tp_dim", None)
        units = default_units(model) if stage == 3 else None
        opt = ZeroOptimizer(model.parameters(), torch.optim.AdamW, stage, group, units=units, **ADAM)
        return Variant(model, opt, batches[0])

    variants: dict[str, Variant] = {}
    model = ddp()
    n_params = sum(p.numel() for p in model.parameters())
    variants["DDP + AdamW"] = Variant(model, torch.optim.AdamW(model.parameters(), **ADAM), batches[0])
    model = ddp()
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, **ADAM)
    variants["DDP + torch ZeroRedundancyOptimizer"] = Variant(model, zero, batches[0])
    for stage in STAGES:
        variants[f"ours stage {stage}"] = ours(stage)
    variants[UNTAGGED] = ours(1, untag=True)

    losses = {}
    for name, variant in variants.items():
        before = variant.mean_loss()
        variant.step()
        losses[name] = {"before": before, "after_one_step": variant.mean_loss()}
    reference = losses["DDP + AdamW"]["after_one_step"]
    for name, loss in losses.items():
        loss["diff_vs_ddp_adamw"] = abs(loss["after_one_step"] - reference)
        assert loss["diff_vs_ddp_adamw"] <= LOSS_TOLERANCE, f"{name}: loss after one step differs: {loss}"

    # The bare collectives on one flat fp32 buffer of all parameters: what stage 1 does to the gradients
    # (all-reduce), what stage 2 could do instead (reduce-scatter), and the parameter all-gather.
    flat = torch.zeros(n_params + (-n_params) % world_size)
    shard = torch.zeros(flat.numel() // world_size)
    collectives = interleaved_times(
        {
            "all_reduce": lambda: dist.all_reduce(flat, group=group),
            "reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(shard, flat, group=group),
            "all_gather_into_tensor": lambda: dist.all_gather_into_tensor(flat, shard, group=group),
        },
        warmup,
        rounds[shapes[-1]],
        group,
    )

    runs = []
    for (b, s), ids in zip(shapes, batches, strict=True):
        for variant in variants.values():
            variant.set_batch(ids)
        steps = {name: v.step for name, v in variants.items()}
        times = interleaved_times(steps, warmup, rounds[(b, s)], group)
        ddp_times = times["DDP + AdamW"]
        torch_zero = times["DDP + torch ZeroRedundancyOptimizer"]
        result = {
            name: {
                **summary(t),
                "paired_ratio_vs_ddp_adamw": paired_ratio(t, ddp_times),
                "ratio_of_medians_vs_ddp_adamw": statistics.median(t) / statistics.median(ddp_times),
                "ratio_of_min_vs_ddp_adamw": min(t) / min(ddp_times),
                "paired_ratio_vs_torch_zero": paired_ratio(t, torch_zero),
                "ratio_of_medians_vs_torch_zero": statistics.median(t) / statistics.median(torch_zero),
            }
            for name, t in times.items()
        }
        runs.append({"batch_per_rank": [b, s], "rounds": rounds[(b, s)], "variants": result})
    return {
        "parameters": n_params,
        "world_size": world_size,
        "warmup": warmup,
        "buckets_ours": {name: len(v.opt.buckets) for name, v in variants.items() if name.startswith("ours")},
        "losses": losses,
        "loss_batch_per_rank": list(shapes[0]),
        "collectives_flat_fp32": {name: summary(t) for name, t in collectives.items()},
        "runs": runs,
    }


# ---------------------------------------------------------------------------------------------- main


def print_memory(rows: list[dict]) -> None:
    headers = [
        "dp",
        "params",
        "stage",
        "params B/p",
        "grads B/p",
        "master B/p",
        "Adam m,v B/p",
        "total B/p",
        "ours formula",
        "measured / ours",
        "paper",
        "measured / paper",
        "exact bytes",
    ]
    table = []
    for r in rows:
        m = r["measured_per_param"]
        total = r["measured_per_param_total"]
        table.append(
            [
                r["dp"],
                r["precision"],
                r["stage"],
                f"{m['params']:.3f}",
                f"{m['grads']:.3f}",
                f"{m['master']:.3f}",
                f"{m['optim_state']:.3f}",
                f"{total:.3f}",
                f"{r['ours_formula_per_param_total']:.3f}",
                f"{total / r['ours_formula_per_param_total']:.4f}",
                f"{r['paper_per_param']:.3f}",
                f"{total / r['paper_per_param']:.3f}",
                "equal" if r["exact_match"] else "DIFFER",
            ]
        )
    print(markdown_table(headers, table))


def print_times(result: dict) -> None:
    b, s = result["loss_batch_per_rank"]
    print(
        f"\nloss (mean over ranks, batch {b}x{s} per rank) before and after one step from the same weights:"
    )
    rows = [
        [name, f"{v['before']:.6f}", f"{v['after_one_step']:.6f}", f"{v['diff_vs_ddp_adamw']:.1e}"]
        for name, v in result["losses"].items()
    ]
    print(markdown_table(["variant", "loss before", "loss after 1 step", "|diff| vs DDP + AdamW"], rows))
    flat = result["collectives_flat_fp32"]
    print(
        f"\nbare collectives on all {result['parameters'] / 1e6:.2f} M parameters as one fp32 buffer "
        + "(median): "
        + ", ".join(f"{name} {v['median_ms']:.1f} ms" for name, v in flat.items())
    )
    headers = [
        "variant",
        "median ms",
        "q1-q3 ms",
        "/ DDP+AdamW (paired)",
        "/ DDP+AdamW (medians)",
        "/ DDP+AdamW (min)",
        "/ torch ZeRO (paired)",
        "/ torch ZeRO (medians)",
    ]
    for run in result["runs"]:
        b, s = run["batch_per_rank"]
        print(f"\nbatch {b}x{s} per rank, {run['rounds']} rounds:")
        rows = [
            [
                name,
                v["median_ms"],
                f"{v['q1_ms']:.1f}-{v['q3_ms']:.1f}",
                f"{v['paired_ratio_vs_ddp_adamw']:.3f}",
                f"{v['ratio_of_medians_vs_ddp_adamw']:.3f}",
                f"{v['ratio_of_min_vs_ddp_adamw']:.3f}",
                f"{v['paired_ratio_vs_torch_zero']:.3f}",
                f"{v['ratio_of_medians_vs_torch_zero']:.3f}",
            ]
            for name, v in run["variants"].items()
        ]
        print(markdown_table(headers, rows))


def code_version() -> dict:
    """The commit measured, and whether parallel/data/ differed from it (a shared working tree)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "zero_files_modified": git("status", "--porcelain", "parallel/data/"),
    }


def main() -> None:
    args = parse_args("bench_zero", __doc__.splitlines()[0])
    rows, batch = [], None
    for dp in DP_SIZES[:1] if args.quick else DP_SIZES:  # --quick: dp 2 only (dp 4 oversubscribes 2 cores)
        part = run_world(memory, args.quick, world_size=dp)
        rows += part["rows"]
        batch = part["batch_per_rank"]
    n_params = rows[0]["parameters"]
    print(
        f"MLATransformer {n_params / 1e6:.3f} M parameters; per-rank bytes per parameter after one step "
        f"(batch {batch[0]}x{batch[1]} per rank), AdamW, gloo"
    )
    print_memory(rows)
    for r in rows:
        if len(set(r["total_bytes_every_rank"])) != 1:
            print(
                f"note: dp {r['dp']} {r['precision']} stage {r['stage']}: ranks differ "
                f"{r['total_bytes_every_rank']}"
            )

    timing = run_world(step_time, args.quick, world_size=2)
    print(
        f"\nstep time, dp 2 on gloo, fp32, interleaved and rotated rounds after {timing['warmup']} "
        f"warm-up; our buckets: {timing['buckets_ours']}"
    )
    print_times(timing)
    write_json(
        args.json,
        {
            "benchmark": "zero",
            "code": code_version(),
            "config": CONFIG,
            "adamw": ADAM,
            "memory": rows,
            "step_time": timing,
        },
    )


if __name__ == "__main__":
    main()
