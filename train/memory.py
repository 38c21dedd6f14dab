"""Memory estimator: the bytes one GPU needs for a training configuration, before launch; GPU presets.

Per rank, with P the parameters this rank holds (its TP shard of its pipeline stage; vocabularies and
column-parallel outputs padded to a multiple of tp, as the layers pad them), N the dp size, and w the
parameter bytes (2 for bf16/fp16, 4 for fp32):

    parameters          w P (frozen LoRA bases too; NF4 bases: 4.127 bits each, see parallel/quant.py);
                        ZeRO-3: w P / N for the trainable ones, plus two whole units (gather + prefetch)
    gradients           plain fp32 run (no ZeroOptimizer): 4 P in `.grad` (DataParallel's buckets)
                        ZeroOptimizer (stage >= 1, offload, or 16-bit weights): fp32 buckets of 4 P, kept
                        between steps at stages 0/1; at stages 2/3 a bucket lives from its first gradient
                        until its reduction (about 4 buckets at a time; all of them when gradients
                        accumulate over micro-batches or pipeline stages, inside no_sync), plus the
                        owner's fp32 gradient shard 4 P / N (stage 0: 4 P, nothing is sharded)
    master weights      ZeroOptimizer: 4 P / N (fp32 chunk of every bucket; stage 0: 4 P)
    optimizer state     AdamW: 8 bytes per element it updates (P, or P / N under ZeroOptimizer);
                        AdamW8bit: 2 + 8/256 bytes per element of tensors >= 4096 elements, 8 below;
                        plus a 4-byte step per tensor (and AdamW8bit's 0.66 MB of code tables)
    buffers             RoPE cos/sin tables, max_seq_len x d_rope x w per layer

ZeroOptimizer state is per bucket (about `bucket_cap_mb`, each padded to a multiple of N, times 256 for
AdamW8bit), reproduced here exactly; with `offload_optimizer` master weights, their gradients and the
optimizer state are on the host. Trainable parameters are all parameters, or only the LoRA adapters (then
ZeRO shards only those). On the host, each rank also builds its chunk in fp32 before casting and moving
it: 4 bytes per parameter at start (`host_at_start`).

Activations, per micro-batch, per token of the full sequence, for a decoder layer (e the activation
bytes, T = tp, S = T under sequence parallelism else 1, h hidden, H heads, I the MLP width, norms
(4 + 2e) d bytes: their fp32 input, normalised value and output):

    norms and residual  2 ((4 + 2e) h + 4) / S      [SP: + 2 e h for the two gathered inputs, kept whole]
    latents             (4 + 2e) q_lora + 4 + e (kv_lora + d_rope) + (4 [e = 2] + 2e) kv_lora + 4
    heads (all / T)     e H (d_qk + d_nope + d_v + d_v)     q, [k_nope, v], and o_proj's input
    attention core / T  e H (2 d_qk + d_v) + 4 H            query, key, output and log-sum-exp
                        (torch's CPU "math" fallback: about 4 H (2 d_qk + d_v + s)); not kept at all
                        under selective recompute
    MLP / T             4 e I                               gate, up, silu(gate), their product

times the micro-batches in flight on the rank (1 without a pipeline; the schedule's peak from
`parallel.pipeline.schedules.simulate` with one) times its layers. Full recompute keeps e h / S per
layer instead, and recomputes one layer at a time. One layer's worth (two with full recompute: the
recomputed one) is added for the backward working set (gradients of the activations being consumed).
The last stage adds the loss: logits of e V / T, their fp32 softmax (4 V / T) kept for backward per
micro-batch in flight, and about 12 V / T transient bytes while it is computed.

Margin, stated: 10% of the estimate for the caching allocator's fragmentation, plus 1 GiB for the CUDA
context, NCCL and cuBLAS workspaces (outside torch's allocator). `fits` compares estimate + margin with
the device's memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import lru_cache

from models.config import MLAConfig
from models.transformer import StageSpec, split_layers
from parallel.data.buckets import plan_zero_buckets
from parallel.lowbit.lora import target_matches
from parallel.pipeline.schedules import build_schedule, simulate
from train.config import Config

GIB = 2**30
FRAGMENTATION = 0.10
FIXED_OVERHEAD = 1 * GIB
ADAM8_TABLES = 512 * 4 + 131072 + 131072 * 4  # parallel.lowbit.adamw8bit.MomentTables, per device
MIN_8BIT, BLOCK_8BIT, NF4_BLOCK = 4096, 256, 64


@dataclass(frozen=True)
class GPU:
    """A GPU model: memory as nvidia-smi reports it, bf16 support, dense 16-bit tensor-core peak (fp32
    accumulate, no sparsity) and the bandwidth of the link between GPUs of one machine (GB/s, one way)."""

    name: str
    memory_gib: float
    bf16: bool
    peak_tflops: float
    link_gb_s: float
    description: str


GPU_PRESETS: dict[str, GPU] = {
    g.name: g
    for g in [
        GPU("v100", 16160 / 1024, False, 125.0, 150.0, "Tesla V100-SXM2-16GB (NVLink 2)"),
        GPU("v100s", 32510 / 1024, False, 130.0, 12.0, "Tesla V100S-PCIE-32GB (PCIe 3)"),
        GPU("t4", 15360 / 1024, False, 65.0, 12.0, "Tesla T4 16 GB (PCIe 3)"),
        GPU("a5000", 24564 / 1024, True, 111.1, 24.0, "RTX A5000 24 GB (PCIe 4)"),
        GPU("rtx4090", 24564 / 1024, True, 165.2, 24.0, "GeForce RTX 4090 24 GB (PCIe 4)"),
        GPU("rtx5090", 32607 / 1024, True, 209.5, 48.0, "GeForce RTX 5090 32 GB (PCIe 5)"),
        GPU("a100-40gb", 40960 / 1024, True, 312.0, 300.0, "A100-SXM4-40GB (NVLink 3)"),
        GPU("a100-80gb", 81920 / 1024, True, 312.0, 300.0, "A100-SXM4-80GB (NVLink 3)"),
        GPU("h100", 81559 / 1024, True, 989.4, 450.0, "H100 SXM5 80 GB (NVLink 4)"),
        GPU("h200", 143771 / 1024, True, 989.4, 450.0, "H200 SXM 141 GB (NVLink 4)"),
    ]
}
_DEVICE_NAMES = [  # substrings of torch.cuda.get_device_name(), most specific first
    ("v100s", "v100s"),
    ("v100", "v100"),
    ("t4", "t4"),
    ("a5000", "a5000"),
    ("4090", "rtx4090"),
    ("5090", "rtx5090"),
    ("a100-sxm4-40", "a100-40gb"),
    ("a100-pcie-40", "a100-40gb"),
    ("a100", "a100-80gb"),
    ("h200", "h200"),
    ("h100", "h100"),
]


def gpu_preset(name: str) -> GPU:
    """The preset called `name` (lower case); an unknown name lists the known ones."""
    if name not in GPU_PRESETS:
        raise ValueError(f"--gpu {name!r}: unknown GPU; known: {', '.join(GPU_PRESETS)}")
    return GPU_PRESETS[name]


def detect_gpu(device_name: str) -> GPU | None:
    """The preset of a CUDA device name such as 'Tesla T4' or 'NVIDIA H100 80GB HBM3', if known."""
    lowered = device_name.lower().replace(" ", "")
    for needle, preset in _DEVICE_NAMES:
        if needle in lowered:
            return GPU_PRESETS[preset]
    return None


# ---------------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class TensorSpec:
    """One parameter of one rank: local element count, whether it trains, how it is split and grouped."""

    name: str
    numel: int
    trainable: bool
    tp_sharded: bool
    matrix: bool  # dim >= 2: the weight-decay parameter group
    unit: int  # ZeRO-3 gather unit within its chunk
    nf4_bytes: int | None = None  # frozen NF4 base: bytes of its codes and scales


def nf4_bytes(numel: int) -> int:
    """Bytes of `quantize_nf4` with double quantization: packed codes, 8-bit absmaxes, their scales, mean."""
    blocks = -(-numel // NF4_BLOCK)
    groups = -(-blocks // 256)
    return blocks * NF4_BLOCK // 2 + groups * 256 + groups * 4 + 4


def _linear(name, out_f, in_f, kind, tp, unit, lora) -> list[TensorSpec]:
    """A linear of kind "linear" (replicated), "column" or "row", plain or LoRA-adapted."""
    local_out = -(-out_f // tp) if kind == "column" else out_f
    local_in = in_f // tp if kind == "row" else in_f
    sharded = kind != "linear"  # marked with tp_dim even at tp=1
    if lora is None or not lora.enabled or not target_matches(name, lora.targets):
        return [
            TensorSpec(
                name + ".weight", local_out * local_in, lora is None or not lora.enabled, sharded, True, unit
            )
        ]
    r = lora.r
    a_in = local_in if kind == "row" else in_f
    b_out = local_out if kind == "column" else out_f
    base = local_out * local_in
    return [
        TensorSpec(name + ".lora_A.weight", r * a_in, True, kind == "row", True, unit),
        TensorSpec(name + ".lora_B.weight", b_out * r, True, kind == "column", True, unit),
        TensorSpec(
            name + ".base_layer.weight",
            base,
            False,
            sharded,
            True,
            unit,
            nf4_bytes(base) if lora.quantize_base == "nf4" else None,
        ),
    ]


def model_tensors(mcfg: MLAConfig, tp: int, stage: StageSpec, lora=None) -> list[TensorSpec]:
    """The parameters of one rank's chunk in `MLATransformer.named_parameters()` order."""
    h, H, c = mcfg.hidden_size, mcfg.num_heads, mcfg
    trains = lora is None or not lora.enabled
    out: list[TensorSpec] = []
    unit = 0
    if stage.is_first:
        out.append(TensorSpec("model.embed_tokens.weight", -(-c.vocab_size // tp) * h, trains, True, True, 0))
        unit = 1
    for i in range(stage.layer_start, stage.layer_end):
        p = f"model.layers.{i}."
        out.append(TensorSpec(p + "input_layernorm.weight", h, trains, False, False, unit))
        a = p + "self_attn."
        if c.q_lora_rank is None:
            out += _linear(a + "q_proj", H * c.qk_head_dim, h, "column", tp, unit, lora)
        else:
            out += _linear(a + "q_a_proj", c.q_lora_rank, h, "linear", tp, unit, lora)
            out.append(TensorSpec(a + "q_a_layernorm.weight", c.q_lora_rank, trains, False, False, unit))
            out += _linear(a + "q_b_proj", H * c.qk_head_dim, c.q_lora_rank, "column", tp, unit, lora)
        out += _linear(
            a + "kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim, h, "linear", tp, unit, lora
        )
        out.append(TensorSpec(a + "kv_a_layernorm.weight", c.kv_lora_rank, trains, False, False, unit))
        out += _linear(
            a + "kv_b_proj", H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank, "column", tp, unit, lora
        )
        out += _linear(a + "o_proj", h, H * c.v_head_dim, "row", tp, unit, lora)
        out.append(TensorSpec(p + "post_attention_layernorm.weight", h, trains, False, False, unit))
        for name, kind in (("gate_proj", "column"), ("up_proj", "column")):
            out += _linear(p + "mlp." + name, c.intermediate_size, h, kind, tp, unit, lora)
        out += _linear(p + "mlp.down_proj", h, c.intermediate_size, "row", tp, unit, lora)
        unit += 1
    if stage.is_last:
        out.append(TensorSpec("model.norm.weight", h, trains, False, False, unit))
        if not c.tie_embeddings:
            out += _linear("lm_head", c.vocab_size, h, "column", tp, unit + 1, lora)
    return out


def _optimizer_bytes(numel: int, name: str) -> int:
    if name == "adamw8bit" and numel >= MIN_8BIT:
        blocks = -(-numel // BLOCK_8BIT)
        return 2 * blocks * BLOCK_8BIT + 2 * 4 * blocks + 4
    return 8 * numel + 4


def zero_buckets(
    trainable: list[TensorSpec], shards: int, cap_mb: float, by_unit: bool, align: int = 1
) -> list[int]:
    """Padded sizes of `ZeroOptimizer`'s buckets, planned by the optimizer's own rule
    (`plan_zero_buckets`) for its two parameter groups: matrices, then the rest."""
    sizes = []
    for group in ([t for t in trainable if t.matrix], [t for t in trainable if not t.matrix]):
        plans = plan_zero_buckets(
            [t.numel for t in group],
            cap_mb,
            shards,
            align,
            units=[t.unit for t in group] if by_unit else None,
            tp_sharded=[t.tp_sharded for t in group],
        )
        sizes += [plan.padded for plan in plans]
    return sizes


# ---------------------------------------------------------------------------------------- estimate


@dataclass
class MemoryEstimate:
    """Bytes on one GPU (the pipeline rank that needs most) and on its host, by part."""

    pp_rank: int
    device: dict[str, int] = field(default_factory=dict)  # peak, by part
    host: dict[str, int] = field(default_factory=dict)
    resting_state: int = 0  # model state between steps (device + host): what a live-tensor count finds
    host_at_start: int = 0  # the rank's chunk built in fp32 on the host before the cast and the move

    @property
    def subtotal(self) -> int:
        return sum(self.device.values())

    @property
    def margin(self) -> int:
        return int(FRAGMENTATION * self.subtotal) + FIXED_OVERHEAD

    @property
    def total(self) -> int:
        return self.subtotal + self.margin

    @property
    def host_total(self) -> int:
        """Peak host bytes: the offloaded state, or the fp32 build at start if larger."""
        return max(sum(self.host.values()), self.host_at_start)

    def table(self) -> str:
        rows = [(f"  {k}", v) for k, v in self.device.items() if v]
        rows.append(("  margin (10% + 1 GiB)", self.margin))
        rows.append(("total per GPU", self.total))
        rows.append(("host (CPU) memory per GPU", self.host_total))
        return "\n".join(f"{k:<32}{v / GIB:>9.2f} GiB" for k, v in rows)


def _stages(config: Config, mcfg: MLAConfig) -> list[list[StageSpec]]:
    dc = config.distributed
    v = dc.virtual_stages
    specs = split_layers(mcfg.num_layers, dc.pp * v, dc.pp_layers)
    return [[specs[c * dc.pp + r] for c in range(v)] for r in range(dc.pp)]


@lru_cache(maxsize=256)
def _peak_in_flight(schedule: str, p: int, m: int, v: int) -> tuple[int, ...]:
    if p == 1 and v == 1:
        return (1,)
    return tuple(simulate(build_schedule(schedule, p, m, v), v).peak_in_flight)


def micro_batches(config: Config) -> tuple[int, int]:
    """(micro_batch_size, micro-batches per step) of one dp rank, as the trainer splits the batch."""
    dc, tc = config.distributed, config.train
    per_rank = tc.global_batch_size // (dc.dp or 1)
    if dc.num_microbatches:
        return per_rank // dc.num_microbatches, dc.num_microbatches
    mbs = tc.micro_batch_size or per_rank
    return mbs, per_rank // mbs


def layer_activation_bytes(mcfg: MLAConfig, config: Config, attention: str = "efficient") -> dict[str, float]:
    """Bytes kept for backward per token of a micro-batch (full sequence), per decoder layer, by part."""
    c, dc = mcfg, config.distributed
    e = 2 if config.train.precision in ("bf16", "fp16") else 4
    T = dc.tp or 1
    S = T if dc.sequence_parallel and T > 1 else 1
    h, H, s = c.hidden_size, c.num_heads, config.data.seq_len
    norm = (4 + 2 * e) * h + 4
    residual = 2 * norm / S + (2 * e * h - 2 * e * h / S if S > 1 else 0)
    latents = e * (c.kv_lora_rank + c.qk_rope_head_dim) + (4 * (e == 2) + 2 * e) * c.kv_lora_rank + 4
    if c.q_lora_rank is not None:
        latents += (4 + 2 * e) * c.q_lora_rank + 4
    heads = e * H * (c.qk_head_dim + c.qk_nope_head_dim + 2 * c.v_head_dim) / T
    if attention == "math":  # torch's CPU fallback: fp32 scaled query, key, probabilities and values
        core = (4 * H * (2 * c.qk_head_dim + c.v_head_dim + s) + (H * s if c.dropout > 0 else 0)) / T
    else:
        core = (e * H * (2 * c.qk_head_dim + c.v_head_dim) + 4 * H) / T
    mlp = 4 * e * c.intermediate_size / T
    dropout = 2 * h / S if c.dropout > 0 else 0
    return {
        "residual": residual,
        "latents": latents,
        "heads": heads,
        "core": core,
        "mlp": mlp,
        "dropout": dropout,
    }


_STATE_CACHE: dict[tuple, tuple[dict[str, int], dict[str, int], int, tuple[int, ...]]] = {}


def _state_key(config: Config, mcfg: MLAConfig, pp_rank: int) -> tuple:
    dc, lc = config.distributed, config.lora
    lora = (lc.r, str(lc.targets), lc.quantize_base) if lc.enabled else None
    layout = (dc.tp or 1, dc.dp or 1, dc.pp, dc.virtual_stages, str(dc.pp_layers), dc.zero_stage)
    options = (dc.offload_optimizer, dc.bucket_cap_mb, config.optim.name, config.train.precision, lora)
    return (json.dumps(mcfg.to_dict(), sort_keys=True), pp_rank, *layout, *options)


def model_state(
    config: Config, mcfg: MLAConfig, pp_rank: int
) -> tuple[dict[str, int], dict[str, int], int, tuple[int, ...]]:
    """(device bytes by part, host bytes by part, resting state, ZeroOptimizer bucket sizes) of one
    pipeline rank; memoised."""
    key = _state_key(config, mcfg, pp_rank)
    if key not in _STATE_CACHE:
        if len(_STATE_CACHE) > 20_000:
            _STATE_CACHE.clear()
        _STATE_CACHE[key] = _model_state(config, mcfg, pp_rank)
    device, host, resting, buckets = _STATE_CACHE[key]
    return dict(device), dict(host), resting, buckets


def _model_state(config: Config, mcfg: MLAConfig, pp_rank: int):
    dc, tc = config.distributed, config.train
    tp, dp = dc.tp or 1, dc.dp or 1
    w = 2 if tc.precision in ("bf16", "fp16") else 4
    chunks = _stages(config, mcfg)[pp_rank]
    lora = config.lora if config.lora.enabled else None
    # ZeRO-3 units are per chunk (a chunk's embedding, layers, norm and head): number them globally
    tensors = [
        replace(t, unit=ci * 1_000_000 + t.unit)
        for ci, spec in enumerate(chunks)
        for t in model_tensors(mcfg, tp, spec, lora)
    ]
    trainable = [t for t in tensors if t.trainable]
    frozen = [t for t in tensors if not t.trainable]
    uses_zero = dc.zero_stage > 0 or dc.offload_optimizer or tc.precision in ("bf16", "fp16")
    opt = config.optim.name
    layers = sum(s.layer_end - s.layer_start for s in chunks)

    device: dict[str, int] = {}
    host: dict[str, int] = {}
    frozen_dense = w * sum(t.numel for t in frozen if t.nf4_bytes is None)
    nf4 = sum(t.nf4_bytes for t in frozen if t.nf4_bytes is not None)
    buffers = layers * 2 * mcfg.max_seq_len * (mcfg.qk_rope_head_dim // 2) * w
    p_train = sum(t.numel for t in trainable)
    state: dict[str, int] = {}
    transient_grads = 0
    sizes: list[int] = []
    if not uses_zero:
        state["parameters"] = w * p_train
        state["gradients"] = 4 * p_train
        state["optimizer state"] = sum(_optimizer_bytes(t.numel, opt) for t in trainable)
        state["optimizer state"] += ADAM8_TABLES if opt == "adamw8bit" else 0
        where = {}
    else:
        n_shards = 1 if dc.zero_stage == 0 else dp  # stage 0 keeps master and state whole
        align = BLOCK_8BIT if opt == "adamw8bit" else 1
        sizes = zero_buckets(trainable, n_shards, dc.bucket_cap_mb, dc.zero_stage == 3, align)
        shards = [s // n_shards for s in sizes]
        full_grads = 4 * sum(sizes)
        if dc.zero_stage == 3:
            state["parameters"] = w * sum(shards)
            units: dict[int, int] = {}
            for t in trainable:
                units[t.unit] = units.get(t.unit, 0) + t.numel
            transient_grads += w * sum(sorted(units.values())[-2:])  # gathered unit + prefetched one
        else:
            state["parameters"] = w * p_train
        state["gradients"] = 4 * sum(shards) + (full_grads if dc.zero_stage <= 1 else 0)
        state["master weights"] = 4 * sum(shards)
        state["optimizer state"] = sum(_optimizer_bytes(n, opt) for n in shards)
        state["optimizer state"] += ADAM8_TABLES if opt == "adamw8bit" else 0
        where = {"master weights", "optimizer state"} if dc.offload_optimizer else set()
    state["frozen base"] = frozen_dense + nf4
    state["buffers"] = buffers
    resting = sum(state.values())
    if where:
        for key in where:
            host[key] = state.pop(key)
        host["gradient shards"] = 4 * sum(shards)
        state["gradients"] -= 4 * sum(shards)
    device.update(state)
    if transient_grads:
        device["ZeRO-3 gathered units"] = transient_grads
    return device, host, resting, tuple(sizes)


def estimate_rank(
    config: Config, mcfg: MLAConfig, pp_rank: int, attention: str = "efficient"
) -> MemoryEstimate:
    """The estimate for one pipeline rank of `config` (dp, tp, pp set; see the module docstring)."""
    dc, tc = config.distributed, config.train
    tp = dc.tp or 1
    chunks = _stages(config, mcfg)[pp_rank]
    layers = sum(s.layer_end - s.layer_start for s in chunks)
    device, host, resting, buckets = model_state(config, mcfg, pp_rank)
    numel = sum(t.numel for spec in chunks for t in model_tensors(mcfg, tp, spec))
    est = MemoryEstimate(pp_rank, device, host, resting, 4 * numel)
    mbs, m = micro_batches(config)
    if dc.zero_stage >= 2 and buckets:  # full fp32 buckets exist only while backward fills them
        accumulating = m > 1 or dc.pp > 1  # no_sync: every bucket accumulates until the last backward
        live = sum(buckets) if accumulating else sum(sorted(buckets)[-4:])  # 1 filling + 2 reducing + 1
        est.device["gradient buckets in backward"] = 4 * live
    tokens = mbs * config.data.seq_len
    parts = layer_activation_bytes(mcfg, config, attention)
    per_layer = sum(parts.values())
    e = 2 if tc.precision in ("bf16", "fp16") else 4
    S = tp if dc.sequence_parallel and tp > 1 else 1
    mode = dc.recompute
    kept = {"none": per_layer, "selective": per_layer - parts["core"], "full": e * mcfg.hidden_size / S}[mode]
    in_flight = _peak_in_flight(dc.pp_schedule, dc.pp, m, dc.virtual_stages)[pp_rank]
    est.device["activations"] = int(in_flight * layers / len(chunks) * kept * tokens)
    est.device["backward working set"] = int(per_layer * tokens * (2 if mode == "full" else 1))
    if any(s.is_last for s in chunks):  # softmax kept per micro-batch in flight; logits, fp32 copies
        vocab = -(-mcfg.vocab_size // tp)
        final_norm = ((4 + 2 * e) * mcfg.hidden_size + 4) / S + (e * mcfg.hidden_size if S > 1 else 0)
        per_token = vocab * (4 * (in_flight - 1) + e + 8 + 4 * (e == 2)) + in_flight * final_norm
        est.device["logits and loss"] = int(tokens * per_token)
    return est


def estimate_memory(config: Config, mcfg: MLAConfig, attention: str = "efficient") -> MemoryEstimate:
    """The estimate of the pipeline rank that needs the most device memory."""
    ranks = [estimate_rank(config, mcfg, r, attention) for r in range(config.distributed.pp)]
    return max(ranks, key=lambda est: est.total)


def resolved_layout(config: Config, tp: int, dp: int, mbs: int | None = None) -> Config:
    """`config` with an explicit (dp, tp) and micro-batch size, as the trainer resolves them."""
    dc = replace(config.distributed, dp=dp, tp=tp)
    per_rank = config.train.global_batch_size // dp
    mbs = mbs or config.train.micro_batch_size or per_rank
    return replace(config, distributed=dc, train=replace(config.train, micro_batch_size=mbs))


def format_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"
