"""Expert parallelism: all-to-all bytes against the derived minimum, MoE layer step time at ep=2 vs ep=1,
and the memory per rank of the routed experts' weights and optimizer state.

    python benchmarks/bench_expert_parallel.py [--quick]

Two gloo ranks on CPU, each with its own T tokens. ep=1: each rank holds all E routed experts and runs
its tokens through them (`models.moe.MoE`, no communication in the layer). ep=2: each rank holds E/2
experts; tokens go to the rank of their expert and back by all-to-all (parallel/experts/token_dispatch.py).
One step = forward and backward of the layer (fp32, one thread per rank), timed between barriers,
interleaved with the ep=1 step; the figure is the median over rounds of ep=2 time / ep=1 time.

Bytes: every call of the all-to-all is counted (rows a rank sends to another rank x h x 4 bytes; rows
kept by the rank itself are a local copy, not traffic), summed over the ranks. The derived minimum of
one direction is

    sum over every rank's (token, choice) pairs whose expert lives on another rank of h x 4 bytes

(= ranks x T k h 4 minus the pairs routed to local experts); a step moves it four times (dispatch and
combine in forward, their adjoints in backward), plus the E 8-byte counts exchanged once per forward.

Memory: the bytes of the expert parameters on a rank and of their AdamW state (exp_avg, exp_avg_sq,
after one step) at ep=2 over ep=1; expected 1/ep = 0.5.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from _common import (
    interleaved_times,
    markdown_table,
    paired_ratio,
    parse_args,
    run_world,
    summary,
    write_json,
)

import parallel.experts.token_dispatch as dispatch_module
from models import MLAConfig
from models.moe import MoE
from parallel import ParallelDims, init_distributed

CASE = dict(hidden=256, experts=16, top_k=4, width=256)


class ByteCounter:
    """Wraps the all-to-all of parallel/experts/token_dispatch.py and adds up the bytes sent off-rank."""

    def __init__(self, rank: int) -> None:
        self.rank, self.token_bytes, self.count_bytes = rank, 0, 0
        self.inner = dispatch_module._all_to_all

    def __call__(self, x, out_splits, in_splits, group):
        row = x[0].numel() * x.element_size() if x.shape[0] else 0
        sent = sum(n for r, n in enumerate(in_splits) if r != dist.get_rank(group)) * row
        if x.dtype == torch.int64 and x.dim() == 1:  # the expert counts
            self.count_bytes += sent
        else:
            self.token_bytes += sent
        return self.inner(x, out_splits, in_splits, group)


def _layer(config: MLAConfig, ep_group) -> MoE:
    torch.manual_seed(0)
    layer = MoE(config, ep_group=ep_group)
    for name, p in layer.named_parameters():  # the same full weights whatever ep (by global name)
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        p.data.copy_(torch.randn(p.shape, generator=g) * CASE["hidden"] ** -0.5)
    return layer


def _expert_bytes(layer: MoE) -> tuple[int, int]:
    """(weight bytes, AdamW state bytes) of the routed experts, after one optimizer step."""
    params = list(layer.experts.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    weights = sum(p.numel() * p.element_size() for p in params)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    return weights, state


def bench(rank: int, world_size: int, quick: bool) -> dict:
    tokens, (warmup, repeats) = (256, (1, 3)) if quick else (2048, (2, 15))
    config = MLAConfig(
        hidden_size=CASE["hidden"],
        n_routed_experts=CASE["experts"],
        num_experts_per_tok=CASE["top_k"],
        moe_intermediate_size=CASE["width"],
        n_shared_experts=0,
    )
    topo = init_distributed(ParallelDims(dp=world_size, ep=world_size))
    layers = {"ep1": _layer(config, None), "ep2": _layer(config, topo.ep_group)}
    x = torch.randn(tokens, CASE["hidden"], generator=torch.Generator().manual_seed(rank))
    x.requires_grad_(True)  # as inside a model: the input gradient goes back through the dispatch too

    def step(layer: MoE):
        return lambda: (layer(x).square().mean().backward(), layer.zero_grad(set_to_none=True))

    counter = ByteCounter(rank)
    dispatch_module._all_to_all = counter
    step(layers["ep2"])()
    dispatch_module._all_to_all = counter.inner
    chosen = layers["ep2"].gate(x).indices.view(-1)
    local = layers["ep2"].expert_range
    mine = ((chosen < local.start) | (chosen >= local.stop)).sum()
    # summed over the ranks: each rank's combine (and backward) sends what the others dispatched to it
    totals = torch.tensor([int(mine), counter.token_bytes, counter.count_bytes], dtype=torch.int64)
    dist.all_reduce(totals)
    remote_pairs, token_bytes, count_bytes = totals.tolist()
    minimum = remote_pairs * CASE["hidden"] * 4
    times = interleaved_times({name: step(layer) for name, layer in layers.items()}, warmup, repeats)
    memory = {name: _expert_bytes(layer) for name, layer in layers.items()}
    return {
        "case": CASE,
        "tokens_per_rank": tokens,
        "world_size": world_size,
        "repeats": repeats,
        "pairs_per_rank": tokens * CASE["top_k"],
        "remote_pairs": remote_pairs,
        "token_bytes_per_step": token_bytes,
        "count_bytes_per_step": count_bytes,
        "minimum_bytes_per_step": 4 * minimum,
        "bytes_over_minimum": token_bytes / (4 * minimum),
        "ep1": summary(times["ep1"]),
        "ep2": summary(times["ep2"]),
        "ep2_over_ep1": paired_ratio(times["ep2"], times["ep1"]),
        "expert_weight_bytes": {k: v[0] for k, v in memory.items()},
        "expert_state_bytes": {k: v[1] for k, v in memory.items()},
        "memory_ep2_over_ep1": sum(memory["ep2"]) / sum(memory["ep1"]),
    }


def main() -> None:
    args = parse_args("bench_expert_parallel", __doc__.splitlines()[0])
    r = run_world(bench, args.quick)
    c = r["case"]
    print(
        f"MoE layer h={c['hidden']}, {c['experts']} experts, k={c['top_k']}, width {c['width']}; "
        f"{r['tokens_per_rank']} tokens per rank, {r['world_size']} gloo ranks, {r['repeats']} rounds"
    )
    print(
        markdown_table(
            ["figure", "value"],
            [
                ["all-to-all token bytes per step (all ranks)", r["token_bytes_per_step"]],
                ["derived minimum (4 x remote pairs x h x 4)", r["minimum_bytes_per_step"]],
                ["measured / minimum", r["bytes_over_minimum"]],
                ["expert-count bytes per step", r["count_bytes_per_step"]],
                ["ep=1 step ms (median)", r["ep1"]["median_ms"]],
                ["ep=2 step ms (median)", r["ep2"]["median_ms"]],
                ["ep=2 / ep=1 step time (paired)", r["ep2_over_ep1"]],
                ["expert weights + AdamW state, ep=1 (bytes)", sum(_pair(r, "ep1"))],
                ["expert weights + AdamW state, ep=2 (bytes)", sum(_pair(r, "ep2"))],
                ["ep=2 / ep=1 memory (expected 0.5)", r["memory_ep2_over_ep1"]],
            ],
        )
    )
    write_json(args.json, r)


def _pair(r: dict, name: str) -> tuple[int, int]:
    return r["expert_weight_bytes"][name], r["expert_state_bytes"][name]


if __name__ == "__main__":
    main()
