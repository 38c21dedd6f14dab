"""One tensor-parallel MLA decoder block at tp=2 against tp=1: step time and bytes communicated.

What is measured, for `models.transformer.DecoderLayer` (RMSNorm, MLA attention, RMSNorm, SwiGLU MLP)
on an input x of shape (batch, seq, hidden) that needs a gradient (a block in the middle of a model):

1. Time of forward + backward at tp=2 (the block split over the 2 ranks) and at tp=1 (each rank runs a
   full, unsplit copy of the same block on the same input, so both cores are busy in both cases),
   interleaved round by round and timed between barriers; medians, and the speed-up tp1/tp2 (ideal 2)
   as the median of the per-round ratios (robust to the drift of this shared machine), as the ratio of
   medians and as the ratio of minimums (noise from other users only ever adds time). A third step
   in each round replays the tp=2 block's all-reduces alone (same sizes, no compute): the part of the
   tp=2 time that is pure communication, since nothing here overlaps it with compute.
2. The collectives of one forward + backward at tp=2, counted by wrapping `torch.distributed.all_reduce`
   (and all_gather / reduce_scatter / broadcast, which should not occur) for that one step: calls and
   payload bytes per phase, against two lower bounds, with T = batch * seq tokens and 4-byte floats:

   - Megatron dense minimum: forward 2 all-reduces of T*h (after o_proj and after down_proj), backward 2
     all-reduces of T*h (the input gradients of attention and MLP): 4 * T*h * 4 bytes.
   - MLA latent minimum: in MLA the down-projections (q_a_proj, kv_a_proj_with_mqa) and their norms are
     replicated, and only the up-projections are split by heads. Every replicated weight needs its full
     gradient on every rank, e.g. dW_qa = x^T dc_q, so the gradient of each latent that enters the
     head-sharded part must be summed over ranks (summing the partial dx instead would leave dW_qa
     partial). Backward therefore all-reduces c_q (q_lora_rank wide; or x itself, hidden wide, when
     q_lora_rank is None and q_proj is column-parallel), the normed c_kv (kv_lora_rank), and k_pe
     (qk_rope_head_dim), plus the MLP's input gradient (hidden); the input gradient of attention is then
     complete locally. Total T * (2h + h + q_in + kv_lora_rank + qk_rope_head_dim) * 4 bytes.
     (Summing the weight gradients dW_qa, dW_kva instead costs h*(q_in + r_kv + d_rope) per layer, which
     is less only when T < h.)

   The ring all-reduce puts 2(p-1)/p times the payload on the wire per rank (= 1x at p=2); that column
   is what a bandwidth-bound interconnect actually carries.

Correctness: the tp=2 output and input gradient must match tp=1 on the same full weights (fp32, the
only difference is the order of one cross-rank sum; 1e-5 absolute).

    python benchmarks/bench_tensor_parallel.py [--quick] [--json OUT]
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterator

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

from models import MLAConfig
from models.transformer import DecoderLayer
from parallel.tensor import shard_tensor, tp_dim

BASE_CONFIG = dict(
    vocab_size=2048,
    hidden_size=256,
    num_layers=1,
    num_heads=4,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    intermediate_size=688,
    max_seq_len=256,
)
Q_LORA_RANKS = (192, None)
MATCH_TOLERANCE = 1e-5
BYTES_PER_FLOAT = 4
PHASES = ("forward", "backward", "total")


# ---------------------------------------------------------------- counting collectives


def _payload(name: str, args: tuple, kwargs: dict) -> tuple[int, float]:
    """(payload bytes, ring wire bytes per rank) of one collective call, p = the group's size."""
    group = kwargs.get("group")
    p = dist.get_world_size(group)
    if name == "all_reduce":
        n = args[0].numel() * args[0].element_size()
        return n, 2 * (p - 1) / p * n
    if name in ("all_gather", "all_gather_into_tensor"):  # payload: the gathered (output) tensor
        out = args[0]
        n = sum(t.numel() * t.element_size() for t in out) if isinstance(out, list) else out.nbytes
        return n, (p - 1) / p * n
    if name in ("reduce_scatter", "reduce_scatter_tensor"):  # payload: the full input
        inp = args[1]
        n = sum(t.numel() * t.element_size() for t in inp) if isinstance(inp, list) else inp.nbytes
        return n, (p - 1) / p * n
    n = args[0].numel() * args[0].element_size()  # broadcast
    return n, n


COUNTED = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
)


class CollectiveLog:
    """Replaces the torch.distributed collectives by counting wrappers while active."""

    def __init__(self) -> None:
        self.phase = "forward"
        self.calls: list[dict] = []

    @contextlib.contextmanager
    def active(self) -> Iterator[CollectiveLog]:
        originals = {name: getattr(dist, name) for name in COUNTED}

        def wrap(name, original):
            def counted(*args, **kwargs):
                payload, wire = _payload(name, args, kwargs)
                shape = list((args[0][0] if isinstance(args[0], list) else args[0]).shape)
                self.calls.append(
                    {"phase": self.phase, "op": name, "shape": shape, "bytes": payload, "wire_bytes": wire}
                )
                return original(*args, **kwargs)

            return counted

        for name, original in originals.items():
            setattr(dist, name, wrap(name, original))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(dist, name, original)

    def totals(self, phase: str | None = None) -> dict:
        calls = [c for c in self.calls if phase is None or c["phase"] == phase]
        return {
            "calls": len(calls),
            "bytes": sum(c["bytes"] for c in calls),
            "wire_bytes": sum(c["wire_bytes"] for c in calls),
        }


def minimum_bytes(config: MLAConfig, tokens: int) -> dict:
    """Payload lower bounds (bytes) and call counts per phase, as derived in the module docstring."""
    h = config.hidden_size
    q_in = h if config.q_lora_rank is None else config.q_lora_rank
    activation = tokens * h * BYTES_PER_FLOAT
    latent_backward = tokens * (h + q_in + config.kv_lora_rank + config.qk_rope_head_dim) * BYTES_PER_FLOAT
    return {
        "dense": {"forward": 2 * activation, "backward": 2 * activation, "total": 4 * activation},
        "latent": {
            "forward": 2 * activation,
            "backward": latent_backward,
            "total": 2 * activation + latent_backward,
        },
        "latent_calls": {"forward": 2, "backward": 4, "total": 6},
        "dense_calls": {"forward": 2, "backward": 2, "total": 4},
    }


# ---------------------------------------------------------------- the benchmark


def sharded_copy(full: DecoderLayer, config: MLAConfig, group, rank: int, world: int) -> DecoderLayer:
    """A tp=`world` block holding this rank's shard of `full`'s weights."""
    layer = DecoderLayer(config, group)
    full_params = dict(full.named_parameters())
    with torch.no_grad():
        for name, param in layer.named_parameters():
            dim = tp_dim(param)
            source = full_params[name]
            param.copy_(source if dim is None else shard_tensor(source, dim, rank, world))
    return layer


def forward_backward(layer, x, positions, grad_out, log: CollectiveLog | None = None) -> torch.Tensor:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    y = layer(x, positions)
    if log is not None:
        log.phase = "backward"
    y.backward(grad_out)
    return y


def bench_one(config: MLAConfig, group, rank: int, world: int, shape, warmup: int, repeats: int) -> dict:
    batch, seq = shape
    torch.manual_seed(0)  # same seed on every rank: same full weights, same (replicated) input
    full = DecoderLayer(config, None)
    split = sharded_copy(full, config, group, rank, world)
    x = torch.randn(batch, seq, config.hidden_size, requires_grad=True)
    grad_out = torch.randn(batch, seq, config.hidden_size)
    positions = torch.arange(seq)

    y_full = forward_backward(full, x, positions, grad_out).detach()
    dx_full = x.grad.clone()
    log = CollectiveLog()
    with log.active():
        y_split = forward_backward(split, x, positions, grad_out, log).detach()
    dx_split = x.grad.clone()
    out_diff = (y_split - y_full).abs().max().item()
    dx_diff = (dx_split - dx_full).abs().max().item()
    assert out_diff <= MATCH_TOLERANCE and dx_diff <= MATCH_TOLERANCE, (out_diff, dx_diff)

    assert all(c["op"] == "all_reduce" for c in log.calls), "expected only all-reduces without SP"
    buffers = [torch.zeros(c["shape"]) for c in log.calls]
    times = interleaved_times(
        {
            "tp2": lambda: forward_backward(split, x, positions, grad_out),
            "tp1": lambda: forward_backward(full, x, positions, grad_out),
            "comm": lambda: [dist.all_reduce(b, group=group) for b in buffers],
        },
        warmup,
        repeats,
        group,
    )
    tokens = batch * seq
    return {
        "q_lora_rank": config.q_lora_rank,
        "shape": [batch, seq, config.hidden_size],
        "layer_parameters": sum(p.numel() for p in full.parameters()),
        "max_abs_diff_output": out_diff,
        "max_abs_diff_input_grad": dx_diff,
        "tp1": summary(times["tp1"]),
        "tp2": summary(times["tp2"]),
        "comm_alone": summary(times["comm"]),
        "speedup_of_medians": statistics.median(times["tp1"]) / statistics.median(times["tp2"]),
        "speedup_paired": paired_ratio(times["tp1"], times["tp2"]),
        "calls": log.calls,
        "measured": {phase: log.totals(None if phase == "total" else phase) for phase in PHASES},
        "minimum": minimum_bytes(config, tokens),
    }


def bench(rank: int, world_size: int, quick: bool) -> dict:
    group = dist.group.WORLD
    shapes = [(2, 64)] if quick else [(4, 128), (8, 256)]
    warmup, repeats = (2, 5) if quick else (5, 60)
    runs = [
        bench_one(MLAConfig(**BASE_CONFIG, q_lora_rank=q), group, rank, world_size, shape, warmup, repeats)
        for shape in shapes
        for q in Q_LORA_RANKS
    ]
    return {
        "config": BASE_CONFIG,
        "world_size": world_size,
        "warmup": warmup,
        "repeats": repeats,
        "runs": runs,
    }


# ---------------------------------------------------------------- report


def main() -> None:
    args = parse_args("bench_tensor_parallel", __doc__.splitlines()[0])
    result = run_world(bench, args.quick)
    p = result["world_size"]
    print(
        f"One MLA DecoderLayer, tp={p} vs tp=1, {p} ranks on gloo, {result['repeats']} interleaved rounds "
        f"after {result['warmup']} warm-up; forward + backward (input needs its gradient)\n"
    )
    rows = []
    for r in result["runs"]:
        rows.append(
            [
                r["q_lora_rank"],
                "x".join(map(str, r["shape"])),
                r["tp1"]["median_ms"],
                r["tp2"]["median_ms"],
                r["comm_alone"]["median_ms"],
                f"{r['speedup_of_medians']:.2f}",
                f"{r['speedup_paired']:.2f}",
                f"{r['tp1']['min_ms'] / r['tp2']['min_ms']:.2f}",
                f"{r['speedup_paired'] / p:.0%}",
                f"{max(r['max_abs_diff_output'], r['max_abs_diff_input_grad']):.1e}",
            ]
        )
    headers = [
        "q_lora_rank",
        "x shape",
        "tp=1 ms",
        f"tp={p} ms",
        "its all-reduces alone ms",
        "speed-up (medians)",
        "speed-up (paired)",
        "speed-up (min)",
        "efficiency (paired)",
        "max abs diff vs tp=1",
    ]
    print(markdown_table(headers, rows))

    print("\nBytes communicated per layer (fp32 payload; ring wire bytes per rank = 2(p-1)/p x payload)\n")
    rows = []
    for r in result["runs"]:
        mins = r["minimum"]
        for phase in PHASES:
            m = r["measured"][phase]
            rows.append(
                [
                    r["q_lora_rank"],
                    "x".join(map(str, r["shape"])),
                    phase,
                    f"{m['calls']} / {mins['dense_calls'][phase]} / {mins['latent_calls'][phase]}",
                    m["bytes"],
                    mins["dense"][phase],
                    mins["latent"][phase],
                    f"{m['bytes'] / mins['dense'][phase]:.3f}",
                    f"{m['bytes'] / mins['latent'][phase]:.3f}",
                    int(m["wire_bytes"]),
                ]
            )
    headers = [
        "q_lora_rank",
        "x shape",
        "phase",
        "calls (measured / dense / latent)",
        "measured bytes",
        "dense min",
        "MLA latent min",
        "measured / dense",
        "measured / latent",
        "ring wire bytes/rank",
    ]
    print(markdown_table(headers, rows))

    for r in result["runs"]:
        if r["shape"] != result["runs"][0]["shape"]:
            continue  # the same calls at every shape, only the sizes scale with batch * seq
        print(f"\ncollectives of one forward + backward, q_lora_rank={r['q_lora_rank']}:")
        for c in r["calls"]:
            print(f"  {c['phase']:8s} {c['op']:14s} {str(tuple(c['shape'])):18s} {c['bytes']:>9d} bytes")
    write_json(args.json, {"benchmark": "tensor_parallel", **result})


if __name__ == "__main__":
    main()
