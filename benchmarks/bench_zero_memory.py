"""Peak and between-step memory per rank: our ZeRO (stages 1-3) against torch's ZeroRedundancyOptimizer
and FSDP2 (`fully_shard`), measured, not counted.

Each variant trains the `MLATransformer` of bench_zero.py (3.64 M parameters, fp32, AdamW, batch 8x128
per rank) for a few steps in its own fresh 2-rank gloo world, one thread per rank. Memory is the
resident set of each rank's process (`/proc/self/status`), relative to the process before the model
was built: `VmRSS` after `zero_grad()` ("between steps") and the peak `VmHWM` of one full step
(forward, backward, optimizer step, `zero_grad()`), reset before it through `/proc/self/clear_refs`.
So that the resident set follows the tensors, every allocation of 64 KiB or more is its own mapping
(`MALLOC_MMAP_THRESHOLD_=65536`, set before the ranks start): freeing a tensor returns its pages at once.
The larger of the two ranks is reported. FSDP2 shards the same units as our stage 3 (embedding, each
decoder layer, final norm, head) and then the root.

    python benchmarks/bench_zero_memory.py [--quick] [--json OUT]
"""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist
from _common import markdown_table, parse_args, run_world, write_json

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
VARIANTS = ("torch ZeroRedundancyOptimizer", "ours stage 1", "ours stage 2", "FSDP2", "ours stage 3")
PEERS = {"ours stage 1": "torch ZeroRedundancyOptimizer", "ours stage 2": "FSDP2", "ours stage 3": "FSDP2"}


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status").read().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _build(name: str, world_size: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = MLATransformer(MLAConfig(**CONFIG))
    group = dist.group.WORLD
    if name == "torch ZeroRedundancyOptimizer":
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, process_group=group, forward_sync_buffers=False)
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, **ADAM)
        return model, opt
    if name == "FSDP2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world_size,))
        for unit in default_units(model):
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, torch.optim.AdamW(model.parameters(), **ADAM)
    stage = int(name.rsplit(" ", 1)[1])
    units = default_units(model) if stage == 3 else None
    return model, ZeroOptimizer(model.parameters(), torch.optim.AdamW, stage, group, units=units, **ADAM)


def measure(rank: int, world_size: int, name: str, steps: int) -> dict:
    generator = torch.Generator().manual_seed(1000 + rank)
    batch = torch.randint(CONFIG["vocab_size"], (8, 129), generator=generator)
    gc.collect()
    base = _status_kib("VmRSS")
    model, opt = _build(name, world_size)

    def step() -> None:
        loss = model(batch[:, :-1]).flatten(0, 1).float().log_softmax(-1)
        loss = torch.nn.functional.nll_loss(loss, batch[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(steps):  # optimizer state allocated, allocator settled
        step()
    gc.collect()
    between = _status_kib("VmRSS") - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    step()
    peak = _status_kib("VmHWM") - base
    found = [None] * world_size
    dist.all_gather_object(found, (between, peak))
    return {"between_mib": max(b for b, _ in found) / 1024, "peak_mib": max(p for _, p in found) / 1024}


def main() -> None:
    args = parse_args("bench_zero_memory", __doc__.splitlines()[0])
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned ranks
    steps = 1 if args.quick else 3
    results: dict[str, dict] = {}
    for name in ("FSDP2", "ours stage 3") if args.quick else VARIANTS:  # --quick: two worlds, not five
        try:
            results[name] = run_world(measure, name, steps)
        except Exception as error:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
            results[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    params = sum(p.numel() for p in MLATransformer(MLAConfig(**CONFIG)).parameters())
    rows, ratios = [], {}
    for name, r in results.items():
        if "error" in r:
            rows.append([name, "-", "-", "-", "-", r["error"]])
            continue
        peer = results.get(PEERS.get(name, ""), {})
        if "peak_mib" in peer:
            ratios[name] = {
                "peer": PEERS[name],
                "peak_ratio": r["peak_mib"] / peer["peak_mib"],
                "between_ratio": r["between_mib"] / peer["between_mib"],
            }
        ratio = ratios.get(name)
        rows.append(
            [
                name,
                r["between_mib"],
                r["between_mib"] * 2**20 / params,
                r["peak_mib"],
                f"{ratio['peak_ratio']:.3f} / {ratio['between_ratio']:.3f} vs {ratio['peer']}"
                if ratio
                else "",
                "",
            ]
        )
    print(f"\nper-rank memory, dp 2, fp32, {params:,} parameters, batch 8x128 per rank")
    headers = ["variant", "between steps MiB", "bytes/param", "peak MiB", "ours/peer peak / between", "note"]
    print(markdown_table(headers, rows))
    write_json(args.json, {"parameters": params, "variants": results, "ratios": ratios})


if __name__ == "__main__":
    main()
