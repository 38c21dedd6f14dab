"""Routed experts against a dense MLP of the same active FLOPs: one layer's training step time.

    python benchmarks/bench_moe.py [--quick]

The MoE layer (`models.moe.MoE`: router, tokens sorted by expert, one matmul chain per expert on its
contiguous block, weighted index_add back) has E routed experts of width w, k chosen per token, no
shared expert; the dense baseline is `models.mlp.MLP` of width k w, so both do 3 h k w multiply-adds
per token in the expert matmuls (the router's E h more is part of the MoE's cost). One step = forward
and backward of the layer on T tokens (fp32, one process, one thread). Rounds are interleaved; the
figure is the median over rounds of MoE time / dense time. Cases: the DeepSeek-V2-Lite shape scaled
down (64 experts, k 6) and a coarser one (8 experts, k 2), where the per-expert loop costs less.
"""

from __future__ import annotations

import time

import torch
from _common import markdown_table, paired_ratio, parse_args, summary, write_json

from models import MLAConfig
from models.mlp import MLP
from models.moe import MoE

CASES = {  # name: (hidden, experts, top-k, expert width)
    "64 experts, k 6 (V2-Lite routing)": (512, 64, 6, 352),
    "8 experts, k 2": (512, 8, 2, 1024),
}


def layers(hidden: int, experts: int, k: int, width: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    config = MLAConfig(
        hidden_size=hidden,
        n_routed_experts=experts,
        num_experts_per_tok=k,
        moe_intermediate_size=width,
        n_shared_experts=0,
        init_std=0.05,
    )
    torch.manual_seed(0)
    moe, dense = MoE(config), MLP(config, intermediate_size=k * width)
    for module in (moe, dense):
        for p in module.parameters():
            torch.nn.init.normal_(p, std=hidden**-0.5)
    return moe, dense


def step(layer: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    layer(x).square().mean().backward()
    layer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure(case: tuple[int, int, int, int], tokens: int, rounds: int) -> dict:
    torch.set_num_threads(1)
    moe, dense = layers(*case)
    x = torch.randn(1, tokens, case[0], generator=torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {"moe": [], "dense": []}
    for i in range(rounds + 1):  # round 0 is warm-up
        order = [("moe", moe), ("dense", dense)][:: 1 if i % 2 else -1]
        for name, layer in order:
            t = step(layer, x)
            if i:
                times[name].append(t)
    counts = torch.bincount(moe.gate(x.view(-1, case[0])).indices.view(-1), minlength=case[1])
    return {
        "hidden": case[0],
        "experts": case[1],
        "top_k": case[2],
        "expert_width": case[3],
        "tokens": tokens,
        "moe": summary(times["moe"]),
        "dense": summary(times["dense"]),
        "moe_over_dense": paired_ratio(times["moe"], times["dense"]),
        "load_imbalance": float(counts.max() / counts.float().mean()),
    }


def main() -> None:
    args = parse_args("bench_moe", __doc__.splitlines()[0])
    tokens, rounds = (256, 3) if args.quick else (2048, 15)
    results = [{"case": name, **measure(case, tokens, rounds)} for name, case in CASES.items()]
    print(f"one layer, forward + backward on {tokens} tokens, fp32, one thread")
    print(
        markdown_table(
            ["case", "MoE ms (median)", "dense ms (median)", "MoE / dense (paired)", "max/mean tokens"],
            [
                [
                    r["case"],
                    r["moe"]["median_ms"],
                    r["dense"]["median_ms"],
                    r["moe_over_dense"],
                    r["load_imbalance"],
                ]
                for r in results
            ],
        )
    )
    write_json(args.json, {"cases": results})


if __name__ == "__main__":
    main()
