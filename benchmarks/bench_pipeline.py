"""Pipeline schedules on 2 gloo ranks: measured step time and bubble against the simulator and the formula.

Stages are made uniform on purpose: every pipeline stage (every virtual chunk for interleaved) is the same
stack of `parallel.pipeline.deferred_wgrad.Linear` + GELU blocks, so t_B ~ 2 t_F and, split,
t_B(input) ~ t_W ~ t_F.
For each schedule and micro-batch count m:

    ideal     = m * (t_F + t_B) per rank, from the stage's costs measured alone (no communication)
    measured  = step time (barrier to barrier, median of interleaved repetitions)
    bubble    = 1 - ideal / measured
    predicted = the simulator's bubble for the schedule with the measured costs
    formula   = (p-1)/(m+p-1) for GPipe and 1F1B, (p-1)/(v m+p-1) for interleaved

Peak activation memory per stage is the simulator's peak count of micro-batches in flight times the
activations one micro-batch keeps on one stage (measured with saved-tensor hooks).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from _common import interleaved_times, markdown_table, parse_args, run_world, summary, write_json
from torch import nn

from parallel.pipeline.deferred_wgrad import Linear, WeightGradStore
from parallel.pipeline.executor import PipelineExecutor
from parallel.pipeline.schedules import bubble_formula, build_schedule, simulate
from parallel.topology import ParallelDims, init_distributed

HIDDEN, BATCH, SEQ = 512, 8, 128


class UniformStage(nn.Module):
    """`depth` identical Linear-GELU blocks; the last stage's loss is the mean square of its output."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(Linear(HIDDEN, HIDDEN), nn.GELU()) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (self(x) - targets).pow(2).mean()


def stage_costs(depth: int, repeats: int) -> dict[str, float]:
    """Median t_F, t_B (full backward), and the zero-bubble split t_B(input), t_W of one stage, alone."""
    stage = UniformStage(depth)
    x = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True)
    grad = torch.randn(BATCH, SEQ, HIDDEN)
    store = WeightGradStore()
    samples: dict[str, list[float]] = {"F": [], "B": [], "B_input": [], "W": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = stage(x)
        t1 = time.perf_counter()
        torch.autograd.backward(out, grad)
        t2 = time.perf_counter()
        with store.recording():
            out = stage(x)
        t3 = time.perf_counter()
        with store.capturing(0):
            torch.autograd.backward(out, grad)
        t4 = time.perf_counter()
        store.flush(0)
        t5 = time.perf_counter()
        for key, value in (("F", t1 - t0), ("B", t2 - t1), ("B_input", t4 - t3), ("W", t5 - t4)):
            samples[key].append(value)
    return {key: sorted(v)[len(v) // 2] for key, v in samples.items()}


def activation_bytes(depth: int) -> int:
    """Bytes one micro-batch keeps saved for backward on one stage."""
    stage = UniformStage(depth)
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stage(torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True))
    return total


def bench(rank: int, world: int, quick: bool) -> dict:
    topo = init_distributed(ParallelDims(pp=world))
    depth = 4 if quick else 12  # heavier stages: the fixed cost of each p2p message weighs less
    repeats = 3 if quick else 10
    rows = []
    for m in (4,) if quick else (4, 8):
        steps, executors, busy = {}, {}, {}
        for name, v in (("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zb1p", 1)):
            torch.manual_seed(rank)
            chunks = {c * world + rank: UniformStage(depth // v) for c in range(v)}
            executor = PipelineExecutor(chunks, topo, name, m, v)
            inputs = [torch.randn(BATCH, SEQ, HIDDEN) for _ in range(m)]
            targets = [torch.randn(BATCH, SEQ, HIDDEN) for _ in range(m)]
            executors[name] = (executor, v)
            busy[name] = []

            def run(e=executor, i=inputs, t=targets, name=name, busy=busy):
                e.step(i, t, (BATCH, SEQ, HIDDEN), torch.float32)
                busy[name].append(e.compute_seconds)

            steps[name] = run
        times = interleaved_times(steps, warmup=2, repeats=repeats)
        # Idle time measured inside the same steps: 1 - (this rank's compute time) / (step time), paired
        # round by round, median, averaged over the ranks — machine-wide slowdowns cancel out.
        idle = {}
        for name in steps:
            pairs = list(zip(busy[name][-repeats:], times[name], strict=True))
            mine = torch.tensor([sorted(1 - b / t for b, t in pairs)[len(pairs) // 2]])
            dist.all_reduce(mine)
            idle[name] = mine.item() / world
        costs = stage_costs(depth, repeats=5 if quick else 20)
        act = activation_bytes(depth)
        for name, (_, v) in executors.items():
            measured = summary(times[name])["median_ms"] / 1e3
            ideal = m * (costs["F"] + costs["B"])
            sim_costs = (
                {"F": costs["F"], "B": costs["B_input"], "W": costs["W"]}
                if name == "zb1p"
                else {"F": costs["F"], "B": costs["B"], "W": 0.0}
            )
            sim = simulate(build_schedule(name, world, m, v), v, sim_costs)
            rows.append(
                {
                    "schedule": name,
                    "p": world,
                    "m": m,
                    "v": v,
                    "step_ms": measured * 1e3,
                    "ideal_ms": ideal * 1e3,
                    "bubble_measured": idle[name],
                    "bubble_vs_ideal": 1 - ideal / measured,
                    "bubble_simulated": sim.bubble,
                    "bubble_formula": bubble_formula(name, world, m, v) if name != "zb1p" else None,
                    "peak_in_flight": max(sim.peak_in_flight),
                    "peak_activation_MB": max(sim.peak_in_flight) * act / v / 2**20,
                }
            )
        rows.append({"costs_ms": {k: 1e3 * t for k, t in costs.items()}, "m": m})
    dist.barrier()
    return {"rows": rows}


def main() -> None:
    args = parse_args("bench_pipeline", __doc__)
    result = run_world(bench, args.quick, world_size=2)
    columns = [
        ("schedule", "schedule"), ("p", "p"), ("m", "m"), ("v", "v"), ("step ms", "step_ms"),
        ("ideal ms", "ideal_ms"), ("idle measured", "bubble_measured"), ("1 - ideal/step", "bubble_vs_ideal"),
        ("bubble simulated", "bubble_simulated"), ("bubble formula", "bubble_formula"),
        ("peak in flight", "peak_in_flight"), ("peak act. MB/stage", "peak_activation_MB"),
    ]  # fmt: skip
    rows = [
        [r[key] if r[key] is not None else "-" for _, key in columns]
        for r in result["rows"]
        if "schedule" in r
    ]
    print(markdown_table([title for title, _ in columns], rows))
    for r in result["rows"]:
        if "costs_ms" in r:
            print(
                f"m={r['m']}: stage costs alone (ms): "
                + ", ".join(f"{k} {v:.2f}" for k, v in r["costs_ms"].items())
            )
    write_json(args.json, result)


if __name__ == "__main__":
    main()
