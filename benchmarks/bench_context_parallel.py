"""Context parallelism for MLA at cp=2 against cp=1: bytes exchanged, attention step time, activation memory.

What is measured, for `models.mla.MultiHeadLatentAttention` on x of shape (batch, seq, hidden) that needs a
gradient, causal attention, fp32, one thread per rank, gloo:

1. Bytes per layer. The collectives of one forward + backward at cp=2 are counted by wrapping
   `torch.distributed.all_gather` / `all_reduce` (received bytes of the all-gather; payload of the
   all-reduce, which is how gloo emulates the backward's reduce-scatter) and `batch_isend_irecv` (bytes
   the ring sends). The derived minimum for a rank
   to see every earlier token's key state is (cp - 1)/cp of the sequence times the numbers per token:
   the latent exchange carries kv_lora_rank + d_rope numbers per token, a K/V exchange (ring attention
   on full heads) num_heads x (d_nope + d_rope + d_v). Both are printed with their ratio, for this
   benchmark's small model and for DeepSeek-V2's shapes (576 vs 40,960 numbers per token).
2. Attention step time (forward + backward) at cp=2 (each rank its two zigzag pieces) against cp=1 (each
   rank a full, unsplit copy on the whole sequence, so both cores are busy in both cases), interleaved
   round by round and timed between barriers; the speed-up cp1/cp2 (ideal 2) as the median of
   per-round ratios. cp=1 runs PyTorch's SDPA, which on CPU is the "math" fallback over the whole
   (seq x seq) score matrix, masked half included; a third step, "cp1 latent", runs our piece-wise
   latent attention at cp=1 (causal pieces skipped as at cp=2), so cp1 latent / cp2 is the speed-up of
   the split alone. A fourth, "cp2 ring", passes the latents round a ring (parallel/context/ring.py)
   instead of gathering them: ring / all-gather is the paired ratio of their step times.
3. Activation memory per rank: the bytes autograd saves for backward in one decoder layer (saved-tensor
   hooks, de-duplicated by storage, parameters excluded) at cp=1 and cp=2, against
   train/activations.py's estimate (per local token, plus the per-layer W_kvb copy under cp).

Correctness: cp=2's output and input gradient must match cp=1 on the same weights (fp32, 1e-5).

    python benchmarks/bench_context_parallel.py [--quick] [--json OUT]
"""

from __future__ import annotations

import contextlib
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

from models import MLAConfig, MLATransformer
from models.mla import MultiHeadLatentAttention
from models.transformer import StageSpec
from parallel.context import context_shard, zigzag_merge, zigzag_split
from parallel.context.exchange import exchange_bytes_per_rank, kv_numbers_per_token, latent_numbers_per_token
from train.activations import context_weight_bytes, layer_activation_bytes
from train.config import load_config

CONFIG = dict(
    vocab_size=256,
    hidden_size=256,
    num_layers=1,
    num_heads=8,
    q_lora_rank=128,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    intermediate_size=512,
)
DEEPSEEK_V2 = dict(num_heads=128, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
CP = 2
MATCH_TOLERANCE = 1e-5


@contextlib.contextmanager
def counting() -> Iterator[dict[str, int]]:
    """Bytes received by all-gathers, the payload of all-reduces and the bytes sent point-to-point (the
    ring) while inside."""
    counts = {"all_gather": 0, "all_reduce": 0, "p2p_sent": 0}
    gather, reduce, p2p = dist.all_gather, dist.all_reduce, dist.batch_isend_irecv

    def all_gather(chunks, x, group=None, **kw):
        counts["all_gather"] += (len(chunks) - 1) * x.numel() * x.element_size()
        return gather(chunks, x, group=group, **kw)

    def all_reduce(x, *args, **kw):
        counts["all_reduce"] += x.numel() * x.element_size()
        return reduce(x, *args, **kw)

    def batch_isend_irecv(ops):
        counts["p2p_sent"] += sum(
            o.tensor.numel() * o.tensor.element_size() for o in ops if o.op is dist.isend
        )
        return p2p(ops)

    dist.all_gather, dist.all_reduce, dist.batch_isend_irecv = all_gather, all_reduce, batch_isend_irecv
    try:
        yield counts
    finally:
        dist.all_gather, dist.all_reduce, dist.batch_isend_irecv = gather, reduce, p2p


def minimum_bytes(dims: dict, seq: int, batch: int, bytes_per_number: int = 4) -> dict[str, float]:
    latent = latent_numbers_per_token(dims["kv_lora_rank"], dims["qk_rope_head_dim"])
    kv = kv_numbers_per_token(
        dims["num_heads"], dims["qk_nope_head_dim"], dims["qk_rope_head_dim"], dims["v_head_dim"]
    )
    return {
        "latent_numbers_per_token": latent,
        "kv_numbers_per_token": kv,
        "latent_bytes": batch * exchange_bytes_per_rank(seq, CP, latent, bytes_per_number),
        "kv_bytes": batch * exchange_bytes_per_rank(seq, CP, kv, bytes_per_number),
        "kv_over_latent": kv / latent,
    }


def _attention_steps(rank: int, seq: int, batch: int):
    """(cp=1 step, cp=2 step, check) closures on this rank."""
    config = MLAConfig(**CONFIG, max_seq_len=seq)
    group = dist.new_group(list(range(CP)))
    torch.manual_seed(0)
    attn = MultiHeadLatentAttention(config)
    x = torch.randn(batch, seq, config.hidden_size)
    grad = torch.randn(batch, seq, config.hidden_size)
    positions = torch.arange(seq)
    x_local, grad_local = zigzag_split(x, 1, rank, CP), zigzag_split(grad, 1, rank, CP)

    def cp1():
        xi = x.clone().requires_grad_()
        attn(xi, positions).backward(grad)
        return xi

    def cp2():
        xi = x_local.clone().requires_grad_()
        shard = context_shard(seq // CP, group)
        out = attn(xi, shard.positions, context=shard)
        out.backward(grad_local)
        return out, xi

    def cp2_ring():
        xi = x_local.clone().requires_grad_()
        shard = context_shard(seq // CP, group, ring=True)
        attn(xi, shard.positions, context=shard).backward(grad_local)

    def cp1_latent():
        xi = x.clone().requires_grad_()
        shard = context_shard(seq, None)
        attn(xi, shard.positions, context=shard).backward(grad)

    def check() -> float:
        xi = x.clone().requires_grad_()
        out1 = attn(xi, positions)
        out1.backward(grad)
        out2, x2 = cp2()
        both = [torch.empty_like(out2) for _ in range(CP)], [torch.empty_like(x2) for _ in range(CP)]
        dist.all_gather(both[0], out2.detach(), group=group)
        dist.all_gather(both[1], x2.grad, group=group)
        full_out, full_grad = (zigzag_merge(torch.cat(t, 1), 1, CP) for t in both)
        return max((full_out - out1).abs().max().item(), (full_grad - xi.grad).abs().max().item())

    return cp1, cp1_latent, cp2, cp2_ring, check


def _saved_bytes(rank: int, seq: int, cp: int) -> dict[str, float]:
    """Bytes saved for backward by one decoder layer on this rank, and the estimate, per local token."""
    config = MLAConfig(**CONFIG, max_seq_len=seq)
    topo = None
    if cp > 1:
        from parallel import ParallelDims, init_distributed

        topo = init_distributed(ParallelDims(cp=cp))
    model = MLATransformer(config, topo, stage=StageSpec(0, 1, is_first=False, is_last=False))
    kept = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in kept:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    local = seq // cp
    x = torch.randn(1, local, config.hidden_size, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(x)
    run = load_config(None, [f"data.seq_len={seq}", f"distributed.cp={cp}"])
    attention = "math" if cp == 1 else "efficient"  # CPU SDPA: the math fallback (train/activations.py)
    estimate = sum(layer_activation_bytes(config, run, attention).values()) * local
    estimate += context_weight_bytes(config, run) if cp > 1 else 0
    return {
        "cp": cp,
        "local_tokens": local,
        "measured_bytes": sum(saved.values()),
        "estimate_bytes": estimate,
    }


def measure(rank: int, world_size: int, seq: int, batch: int, rounds: int) -> dict:
    torch.set_num_threads(1)
    cp1, cp1_latent, cp2, cp2_ring, check = _attention_steps(rank, seq, batch)
    error = check()
    with counting() as counts:
        cp2()
    with counting() as ring_counts:
        cp2_ring()
    times = interleaved_times(
        {"cp1": cp1, "cp1 latent": cp1_latent, "cp2": cp2, "cp2 ring": cp2_ring}, warmup=1, repeats=rounds
    )
    memory = [_saved_bytes(rank, seq, 1), _saved_bytes(rank, seq, CP)]
    return {
        "seq": seq,
        "batch": batch,
        "max_abs_error": error,
        "matches": error < MATCH_TOLERANCE,
        "bytes": {
            "measured_forward_all_gather": counts["all_gather"],
            "measured_backward_all_reduce": counts["all_reduce"],
            "measured_ring_sent_forward_and_backward": ring_counts["p2p_sent"],
            "minimum": minimum_bytes(CONFIG, seq, batch),
        },
        "time": {name: summary(t) for name, t in times.items()},
        "speedup_paired": paired_ratio(times["cp1"], times["cp2"]),
        "speedup_over_latent_cp1_paired": paired_ratio(times["cp1 latent"], times["cp2"]),
        "ring_over_all_gather_paired": paired_ratio(times["cp2 ring"], times["cp2"]),
        "memory": memory,
    }


def main() -> None:
    args = parse_args("bench_context_parallel", __doc__.splitlines()[0])
    seq, batch, rounds = (256, 1, 3) if args.quick else (2048, 1, 10)
    r = run_world(measure, seq, batch, rounds, world_size=CP)
    b, m = r["bytes"], r["bytes"]["minimum"]
    v2 = minimum_bytes(DEEPSEEK_V2, 32768, 1, 2)
    r["deepseek_v2_32k_bf16"] = v2
    print(
        f"one MLA attention layer, {seq} tokens x batch {batch}, cp={CP}, fp32; matches cp=1: {r['matches']}"
    )
    print(
        markdown_table(
            [
                "model",
                "latent numbers/token",
                "K/V numbers/token",
                "latent bytes/rank",
                "K/V bytes/rank",
                "K/V / latent",
            ],
            [
                [
                    "this benchmark",
                    m["latent_numbers_per_token"],
                    m["kv_numbers_per_token"],
                    m["latent_bytes"],
                    m["kv_bytes"],
                    m["kv_over_latent"],
                ],
                [
                    "DeepSeek-V2, 32k, bf16",
                    v2["latent_numbers_per_token"],
                    v2["kv_numbers_per_token"],
                    v2["latent_bytes"],
                    v2["kv_bytes"],
                    v2["kv_over_latent"],
                ],
            ],
        )
    )
    r["forward_bytes_over_minimum"] = b["measured_forward_all_gather"] / m["latent_bytes"]
    print(
        f"measured forward all-gather: {b['measured_forward_all_gather']:,} B "
        f"({r['forward_bytes_over_minimum']:.3f} x the latent minimum); backward (gloo all-reduce in place "
        f"of reduce-scatter): {b['measured_backward_all_reduce']:,} B payload"
    )
    print(
        f"ring, forward + backward: {b['measured_ring_sent_forward_and_backward']:,} B sent "
        f"(latents {CP - 1} x forward and {CP - 1} x backward, fp32 gradient accumulators {CP - 1} x)"
    )
    print(
        markdown_table(
            ["layout", "ms (median)", "q1", "q3"],
            [[k, v["median_ms"], v["q1_ms"], v["q3_ms"]] for k, v in r["time"].items()],
        )
    )
    print(
        f"speed-up cp1/cp2 (paired median, ideal 2): {r['speedup_paired']:.2f} against SDPA, "
        f"{r['speedup_over_latent_cp1_paired']:.2f} against the same latent attention at cp=1; "
        f"ring / all-gather step time at cp=2: {r['ring_over_all_gather_paired']:.3f}"
    )
    for x in r["memory"]:
        x["measured_over_estimate"] = x["measured_bytes"] / x["estimate_bytes"]
    print(
        markdown_table(
            ["cp", "local tokens", "saved bytes/rank", "estimate", "measured / estimate"],
            [
                [
                    x["cp"],
                    x["local_tokens"],
                    x["measured_bytes"],
                    x["estimate_bytes"],
                    x["measured_over_estimate"],
                ]
                for x in r["memory"]
            ],
        )
    )
    write_json(args.json, r)


if __name__ == "__main__":
    main()
