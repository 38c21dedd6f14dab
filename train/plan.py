"""Layout planner: which layouts of a config fit N GPUs of a kind, fastest first.

    python -m train.plan --config FILE --gpus N --gpu NAME [--gpu-memory GiB] [--json] [--top K]

Search space: every (dp, cp, tp, pp) with dp cp tp pp = N, tp at most 8 and dividing the heads and the
MLP width, pp at most the layers, dp dividing the global batch, cp (context parallelism) dividing the
sequence into 2 cp pieces; for an MoE model every expert-parallel size ep dividing dp and the routed
experts; ZeRO stage 0 (and 1, 2, 3 when dp cp > 1);
optimizer offload off/on; the config's optimizer and AdamW8bit; recompute none/selective/full; sequence
parallelism off/on when tp > 1; every micro-batch size dividing the per-rank batch; minus the
combinations the trainer refuses (train/layout.py: ZeRO-3 with zb1p or tied embeddings, pp > 1 with tied
embeddings, sequence parallelism with a sequence length tp does not divide, cp > 1 with MoE or dropout).
Context parallelism is searched only for long sequences (`data.seq_len` >= 8192, or the config's own
`distributed.cp` > 1): shorter ones fit without it. The config's precision is kept, except that bf16
becomes fp16 (with loss scaling) on GPUs without bf16 (V100, T4). Its LoRA
settings, schedule and sequence length are kept. A layout fits when train/memory.py's estimate plus its
margin is at most the GPU's memory (`--gpu-memory` overrides the preset's).

Throughput model (for ranking; stated, not measured): a step takes

    t = t_compute / (1 - bubble) + t_tp + t_cp + t_ep + t_dp + t_offload
    t_compute = tokens x F / N / (peak x eff),   eff = 0.6 x b / (b + 1024), b = tokens per micro-batch
                and rank (the sequence divided by cp; the zigzag split balances causal attention)
    F         = train.flops.flops_per_token (6 N_matmul + attention), 4 instead of 6 N_matmul with LoRA
                (no weight gradients for frozen weights); plus one forward (a third of the full model's
                F) with full recompute, or a third of the attention FLOPs with selective
    bubble    = the schedule's idle fraction from parallel.pipeline.schedules.simulate
    t_tp      = 4 all-reduces (2 forward, 2 backward; SP: the same bytes as all-gather + reduce-scatter)
                of b h e bytes per layer and micro-batch, 2 (tp-1)/tp of them over the GPU link
    t_ep      = 4 all-to-alls (dispatch and combine, forward and backward; 6 with full recompute) of
                b k h e bytes per MoE layer and micro-batch, (ep-1)/ep of them leaving the rank
    t_cp      = the latent all-gather (forward) and reduce-scatter (backward) of (cp-1)/cp of each
                sequence's kv_lora + d_rope numbers per token and layer (1.5x with full recompute)
    t_dp      = the fp32 gradient all-reduce over the R = dp x cp replicas, 2 (R-1)/R 4 P (P: trainable
                parameters per rank, the routed experts' divided by ep, LoRA adapters counted as 1% of the
                weights), plus for ZeRO >= 1 the all-gather of the updated weights, plus for ZeRO-3 two
                parameter all-gathers per micro-batch (over 25 GB/s when N > 8: between machines)
    t_offload = gradients down and weights up over PCIe (16 GB/s), and the CPU optimizer at 1e9
                parameters/s (AdamW8bit 0.3e9)

tokens/s = global batch tokens / t; MFU = tokens/s x F (without recompute) / (N x peak).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import dataclass, replace
from functools import lru_cache

from models.config import MLAConfig
from parallel.pipeline.schedules import build_schedule, simulate
from train.config import Config, ConfigError, load_config
from train.flops import attention_flops_per_token, flops_per_token, matmul_parameters
from train.gpus import GPU, GPU_PRESETS, detect_gpu, gpu_preset
from train.layout import batch_split, model_config, unsupported
from train.memory import GIB, MemoryEstimate, estimate_memory

ALL_LINEARS = ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"] + [
    "gate_proj",
    "up_proj",
    "down_proj",
]
# The throughput model's stated assumptions (module docstring); they rank layouts, they are not measured.
GPUS_PER_NODE = 8  # the usual machine (DGX/HGX): tp stays inside it, dp beyond it crosses the network
PCIE_GB_S = 16.0  # host <-> GPU, one direction: PCIe 3 x16's peak, about what PCIe 4 x16 achieves
INTER_NODE_GB_S = 25.0  # between machines: one 200 Gb/s (InfiniBand HDR) port per GPU
CPU_ADAM_PARAMS_S = {"adamw": 1e9, "adamw8bit": 0.3e9}  # CPU optimizer step, parameters per second
PEAK_EFFICIENCY = 0.6  # fraction of the tensor-core peak that large training matmuls reach
HALF_EFFICIENCY_TOKENS = 1024  # tokens per micro-batch at which that efficiency is halved
LORA_TRAINABLE_FRACTION = 0.01  # adapters of rank 8-16 on every linear: about 1% of the weights
LONG_CONTEXT = 8192  # sequence length from which context parallelism is searched
TP_ROUNDS = 4  # tensor-parallel all-reduces per layer and micro-batch (Megatron): 2 forward, 2 backward


@dataclass
class Candidate:
    """One layout: its config, per-GPU estimate, whether it fits, and the modelled speed."""

    config: Config
    estimate: MemoryEstimate
    fits: bool
    tokens_per_s: float
    mfu: float

    def layout(self) -> dict:
        dc, tc = self.config.distributed, self.config.train
        return {
            "dp": dc.dp,
            "cp": dc.cp,
            "tp": dc.tp,
            "pp": dc.pp,
            "ep": dc.ep,
            "zero_stage": dc.zero_stage,
            "offload_optimizer": dc.offload_optimizer,
            "optimizer": self.config.optim.name,
            "recompute": dc.recompute,
            "sequence_parallel": dc.sequence_parallel,
            "micro_batch_size": tc.micro_batch_size,
            "precision": tc.precision,
        }

    def overrides(self) -> str:
        names = {"optimizer": "optim.name", "micro_batch_size": "train.micro_batch_size"}
        names["precision"] = "train.precision"
        items = self.layout().items()
        return " ".join(f"{names.get(k, 'distributed.' + k)}={str(v).lower()}" for k, v in items)

    def to_json(self) -> dict:
        return {
            **self.layout(),
            "bytes_per_gpu": self.estimate.total,
            "host_bytes_per_gpu": self.estimate.host_total,
            "fits": self.fits,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "mfu": round(self.mfu, 4),
            "breakdown": {**self.estimate.device, "margin": self.estimate.margin},
            "overrides": self.overrides(),
        }


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(config: Config, mcfg: MLAConfig, gpus: int, gpu: GPU) -> list[Config]:
    """Every layout of the search space (module docstring) as a resolved Config."""
    dc, tc = config.distributed, config.train
    precision = "fp16" if tc.precision == "bf16" and not gpu.bf16 else tc.precision
    optimizers = list(dict.fromkeys([config.optim.name, "adamw8bit"]))
    out = []
    for tp in _divisors(gpus):
        if tp > GPUS_PER_NODE or mcfg.num_heads % tp or mcfg.intermediate_size % tp:
            continue
        if mcfg.is_moe and mcfg.moe_intermediate_size % tp:
            continue
        cps = _divisors(gpus // tp) if config.data.seq_len >= LONG_CONTEXT or dc.cp > 1 else [1]
        for pp, cp in itertools.product(_divisors(gpus // tp), cps):
            dp = gpus // (tp * pp * cp)
            if dp * cp * tp * pp != gpus or pp > mcfg.num_layers or tc.global_batch_size % dp:
                continue
            stages = [0] + ([1, 2, 3] if dp * cp > 1 else [])
            eps = [e for e in _divisors(dp) if mcfg.is_moe and mcfg.n_routed_experts % e == 0] or [1]
            for ep, zero, offload, opt, recompute, sp in itertools.product(
                eps, stages, (False, True), optimizers, ("none", "selective", "full"), (False, True)
            ):
                if sp and tp == 1:
                    continue
                for mbs in _divisors(tc.global_batch_size // dp):
                    v, m = (dc.virtual_stages if pp > 1 else 1), tc.global_batch_size // dp // mbs
                    if pp * v > mcfg.num_layers or (
                        pp > 1 and dc.pp_schedule == "interleaved_1f1b" and m % pp
                    ):
                        continue  # the schedule cannot run this split
                    candidate = replace(
                        config,
                        distributed=replace(
                            dc,
                            dp=dp,
                            cp=cp,
                            tp=tp,
                            pp=pp,
                            ep=ep,
                            zero_stage=zero,
                            offload_optimizer=offload,
                            recompute=recompute,
                            sequence_parallel=sp,
                            num_microbatches=None,
                            pp_layers=None,
                            virtual_stages=v,
                        ),
                        optim=replace(config.optim, name=opt),
                        train=replace(tc, micro_batch_size=mbs, precision=precision),
                    )
                    if unsupported(candidate, mcfg) is None:  # the trainer's own checks
                        out.append(candidate)
    return out


@lru_cache(maxsize=1024)
def _bubble(schedule: str, p: int, m: int, v: int) -> float:
    return simulate(build_schedule(schedule, p, m, v), v).bubble if p > 1 else 0.0


def throughput(config: Config, mcfg: MLAConfig, gpu: GPU) -> tuple[float, float]:
    """(tokens/s, MFU) of the throughput model in the module docstring."""
    dc, tc = config.distributed, config.train
    gpus, seq = dc.dp * dc.cp * dc.tp * dc.pp, config.data.seq_len
    mbs, m = batch_split(config, dc.dp)
    model_flops = flops_per_token(mcfg, seq)
    if config.lora.enabled:  # frozen weights get no weight gradient
        model_flops -= 2 * matmul_parameters(mcfg)
    flops = model_flops
    if dc.recompute == "full":
        flops += flops_per_token(mcfg, seq) / 3  # one more forward
    elif dc.recompute == "selective":
        flops += attention_flops_per_token(mcfg, seq) / 3
    tokens = tc.global_batch_size * seq
    b = mbs * seq / dc.cp
    t_compute = (
        tokens * flops / gpus / (gpu.peak_tflops * 1e12 * PEAK_EFFICIENCY * b / (b + HALF_EFFICIENCY_TOKENS))
    )
    bubble = _bubble(dc.pp_schedule, dc.pp, m, dc.virtual_stages)
    link = gpu.link_gb_s * 1e9
    e = 2 if tc.precision in ("bf16", "fp16") else 4
    layers = mcfg.num_layers / dc.pp
    t_tp = 0.0
    if dc.tp > 1:
        rounds = TP_ROUNDS * (1.5 if dc.recompute == "full" else 1)  # full recompute: 2 more forward
        t_tp = rounds * layers * m * 2 * (dc.tp - 1) / dc.tp * b * mcfg.hidden_size * e / link
    t_ep = 0.0
    moe_layers = sum(mcfg.is_moe_layer(i) for i in range(mcfg.num_layers)) if mcfg.is_moe else 0
    if dc.ep > 1:
        rounds = 4 * (1.5 if dc.recompute == "full" else 1)  # full recompute: dispatch + combine again
        pairs = b * mcfg.num_experts_per_tok
        t_ep = rounds * moe_layers / dc.pp * m * (dc.ep - 1) / dc.ep * pairs * mcfg.hidden_size * e / link
    routed = (
        moe_layers * (mcfg.n_routed_experts or 0) * 3 * mcfg.hidden_size * (mcfg.moe_intermediate_size or 0)
    )
    t_cp = 0.0
    if dc.cp > 1:
        rounds = 2 * (1.5 if dc.recompute == "full" else 1)
        latent = mcfg.kv_lora_rank + mcfg.qk_rope_head_dim
        t_cp = rounds * layers * m * (dc.cp - 1) / dc.cp * mbs * seq * latent * e / link
    trainable = (mcfg.num_parameters() - routed * (1 - 1 / dc.ep)) / (dc.tp * dc.pp)
    if config.lora.enabled:
        trainable *= LORA_TRAINABLE_FRACTION
    t_dp = 0.0
    replicas = dc.dp * dc.cp
    if replicas > 1:
        dp_link = min(link, INTER_NODE_GB_S * 1e9) if gpus > GPUS_PER_NODE else link
        share = (replicas - 1) / replicas
        t_dp = 2 * share * 4 * trainable / dp_link
        if dc.zero_stage >= 1:
            t_dp += share * 4 * trainable / dp_link
        if dc.zero_stage == 3:
            t_dp += 2 * m * share * e * trainable / dp_link
    t_offload = 0.0
    if dc.offload_optimizer:
        shard = trainable / (replicas if dc.zero_stage else 1)
        t_offload = 8 * shard / (PCIE_GB_S * 1e9) + shard / CPU_ADAM_PARAMS_S[config.optim.name]
    t = t_compute / (1 - bubble) + t_tp + t_cp + t_ep + t_dp + t_offload
    tokens_per_s = tokens / t
    return tokens_per_s, tokens_per_s * model_flops / (gpus * gpu.peak_tflops * 1e12)


def plan(
    config: Config, mcfg: MLAConfig, gpus: int, gpu: GPU, memory_gib: float | None = None
) -> list[Candidate]:
    """Every layout with its estimate, fitting ones first, each group fastest first."""
    limit = (memory_gib or gpu.memory_gib) * GIB
    candidates = []
    for layout in layouts(config, mcfg, gpus, gpu):
        est = estimate_memory(layout, mcfg)
        tokens_per_s, mfu = throughput(layout, mcfg, gpu)
        candidates.append(Candidate(layout, est, est.total <= limit, tokens_per_s, mfu))
    candidates.sort(key=lambda c: (not c.fits, -round(c.tokens_per_s, 3) if c.fits else 0, c.estimate.total))
    return candidates


def _qlora(config: Config) -> Config:
    lora = replace(config.lora, enabled=True, quantize_base="nf4", targets=ALL_LINEARS)
    return replace(config, lora=lora)


def advice(
    config: Config, mcfg: MLAConfig, gpus: int, gpu: GPU, memory_gib: float | None = None
) -> list[str]:
    """What would make the config fit when no layout does: more GPUs, QLoRA, a bigger GPU."""
    memory = memory_gib or gpu.memory_gib
    best = smallest(config, mcfg, gpus, gpu)
    lines = [f"the smallest layout needs {best.total / GIB:.1f} GiB per GPU; {gpu.name}: {memory:.1f} GiB"]
    for more in (2 * gpus, 4 * gpus, 8 * gpus, 16 * gpus):
        if smallest(config, mcfg, more, gpu).total <= memory * GIB:
            found = [c for c in plan(config, mcfg, more, gpu, memory_gib) if c.fits]
            lines.append(f"more GPUs: {more} x {gpu.name} fit, e.g. {found[0].overrides()}")
            break
    if not (config.lora.enabled and config.lora.quantize_base == "nf4"):
        found = [c for c in plan(_qlora(config), mcfg, gpus, gpu, memory_gib) if c.fits]
        if found:
            lines.append(
                f"QLoRA fits on {gpus} x {gpu.name}: lora.enabled=true lora.quantize_base=nf4 "
                f"(all linear layers) {found[0].overrides()}"
            )
    bigger = [g for g in GPU_PRESETS.values() if g.memory_gib > memory and g.memory_gib * GIB >= best.total]
    if bigger:
        other = min(bigger, key=lambda g: g.memory_gib)
        lines.append(f"a bigger GPU: {gpus} x {other.name} ({other.memory_gib:.0f} GiB each) fit")
    lines.append(
        "CPU offload of the optimizer was considered: the fp32 gradient buckets stay on the GPU, all of "
        "them while gradients accumulate over micro-batches"
    )
    return lines


def smallest(config: Config, mcfg: MLAConfig, gpus: int, gpu: GPU) -> MemoryEstimate:
    """The estimate of the layout that needs the least memory per GPU."""
    return min((estimate_memory(c, mcfg) for c in layouts(config, mcfg, gpus, gpu)), key=lambda e: e.total)


def explain_oom(config: Config, mcfg: MLAConfig, gpus: int, device_name: str, total_bytes: int) -> str:
    """The estimate of `config` and the planner's advice, for a run that ran out of memory."""
    est = estimate_memory(config, mcfg)
    lines = [f"out of memory; the estimate of this layout (pipeline rank {est.pp_rank}):", est.table()]
    gpu = detect_gpu(device_name) if device_name else None
    if gpu is None or total_bytes <= 0:
        return "\n".join(lines + ["try distributed.recompute=full, sequence_parallel, ZeRO"])
    found = [c for c in plan(config, mcfg, gpus, gpu, total_bytes / GIB) if c.fits]
    if found:
        lines.append(f"a layout that fits {gpus} x {gpu.name}: {found[0].overrides()}")
    else:
        lines += advice(config, mcfg, gpus, gpu, total_bytes / GIB)
    return "\n".join(lines)


def _table(candidates: list[Candidate]) -> str:
    head = f"{'dp':>3}{'cp':>3}{'tp':>3}{'pp':>3} {'zero':>4} {'offl':>4} {'optim':<9} "
    head += f"{'recompute':<9} {'sp':<3}"
    head += f"{'mbs':>4} {'GiB/GPU':>8} {'host GiB':>8} {'tok/s':>9} {'MFU':>6}"
    rows = [head]
    for c in candidates:
        x = c.layout()
        offload, sp = ("yes" if x[k] else "no" for k in ("offload_optimizer", "sequence_parallel"))
        rows.append(
            f"{x['dp']:>3}{x['cp']:>3}{x['tp']:>3}{x['pp']:>3} {x['zero_stage']:>4} {offload:>4} "
            f"{x['optimizer']:<9} "
            f"{x['recompute']:<9} {sp:<3}{x['micro_batch_size']:>4} "
            f"{c.estimate.total / GIB:>8.1f} {c.estimate.host_total / GIB:>8.1f} "
            f"{c.tokens_per_s:>9,.0f} {c.mfu:>6.1%}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a training config (YAML)")
    parser.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    parser.add_argument("--gpu", required=True, help=f"GPU kind: {', '.join(GPU_PRESETS)}")
    parser.add_argument("--gpu-memory", type=float, help="GiB per GPU (default: the preset's)")
    parser.add_argument("--json", action="store_true", help="print the layouts as a JSON list")
    parser.add_argument(
        "--top", type=int, help="how many layouts to list (default: 10; with --json every one that fits)"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the config")
    args = parser.parse_intermixed_args(argv)
    try:
        if args.gpus < 1:
            raise ConfigError(f"--gpus={args.gpus}: expected a positive number of GPUs")
        if args.gpu_memory is not None and not 0 < args.gpu_memory < math.inf:
            raise ConfigError(f"--gpu-memory={args.gpu_memory}: expected a positive, finite number of GiB")
        if args.top is not None and args.top < 1:
            raise ConfigError(f"--top={args.top}: expected a positive number of layouts")
        gpu = gpu_preset(args.gpu)
        config = load_config(args.config, args.overrides)
        mcfg = model_config(config, config.data.vocab_size)
        candidates = plan(config, mcfg, args.gpus, gpu, args.gpu_memory)
    except (ConfigError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    fitting = [c for c in candidates if c.fits]
    limit = args.top if args.top is not None else (None if fitting and args.json else 10)
    shown = (fitting or candidates)[:limit]  # none fits: the closest ones
    memory = args.gpu_memory or gpu.memory_gib
    if args.json:
        print(json.dumps([c.to_json() for c in shown], indent=1))
    else:
        what = f"{args.gpus} x {gpu.name} ({memory:.1f} GiB each)"
        print(f"{mcfg.num_parameters() / 1e9:.2f}B-parameter MLA model, {args.config}, on {what}")
        if fitting:
            print(f"{len(fitting)} of {len(candidates)} layouts fit; the fastest by the throughput model:")
            print(_table(shown))
            print(f"\nbest: {shown[0].overrides()}\nper GPU (pipeline rank {shown[0].estimate.pp_rank}):")
            print(shown[0].estimate.table())
    if not fitting:
        sys.stdout.flush()
        lines = advice(config, mcfg, args.gpus, gpu, args.gpu_memory)
        print(f"error: no layout fits on {args.gpus} x {gpu.name}; " + lines[0], file=sys.stderr)
        for line in lines[1:]:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
