"""Memory estimator: the bytes one GPU needs for a training configuration, before launch.

Per rank, with P the parameters this rank holds (its TP shard of its pipeline stage; vocabularies and
column-parallel outputs padded to a multiple of tp, as the layers pad them), N the dp x cp size (every
rank holding the same parameters: ZeRO shards over dp and cp together), and w the parameter bytes (2 for
bf16/fp16, 4 for fp32):

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
    buffers             RoPE cos/sin tables, max_seq_len x d_rope x w per layer; MoE layers: routing
                        statistics, (2 E + 2) w per layer

ZeroOptimizer state is per bucket (about `bucket_cap_mb`, each padded to a multiple of N, times 256 for
AdamW8bit), reproduced here exactly; with `offload_optimizer` master weights, their gradients and the
optimizer state are on the host. Trainable parameters are all parameters, or only the LoRA adapters (then
ZeRO shards only those). On the host, each rank also builds its chunk in fp32 before casting and moving
it: 4 bytes per parameter at start (`host_at_start`).

Activations (the bytes kept for backward, the backward working set, logits and loss) are estimated in
train/activations.py and added per rank.

Mixture of experts: the routed experts' weights are split like the dense MLP over tp; with expert
parallelism (`distributed.ep`) each rank holds only E / ep of them, and ZeroOptimizer shards their
gradients, master weights and optimizer state over the dp / ep ranks holding the same experts (so their
state per rank is 1/ep of the replicated figure at ZeRO 0, and the same 1/dp at stage >= 1: dp/ep shards
of an ep-th of the experts); the router is replicated; V3's correction bias is a frozen parameter.
Activations count the chosen experts only (train/activations.py), balanced routing assumed under ep.

Margin, stated: 10% of the estimate for the caching allocator's fragmentation, plus 1 GiB for the CUDA
context, NCCL and cuBLAS workspaces (outside torch's allocator). `fits` compares estimate + margin with
the device's memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

from models.config import MLAConfig
from models.transformer import StageSpec
from parallel.data.buckets import plan_zero_buckets
from parallel.lowbit.lora import target_matches
from train.activations import activation_bytes
from train.config import Config
from train.layout import batch_split, rank_stages, uses_zero

GIB = 2**30
FRAGMENTATION = 0.10  # stated allowance for the caching allocator's fragmentation (module docstring)
FIXED_OVERHEAD = 1 * GIB  # CUDA context, NCCL and cuBLAS workspaces: outside torch's allocator
ADAM8_TABLES = 512 * 4 + 131072 + 131072 * 4  # parallel.lowbit.adamw8bit.MomentTables, per device
MIN_8BIT = 4096  # AdamW8bit's default min_8bit_size: smaller tensors keep fp32 moments
BLOCK_8BIT = 256  # AdamW8bit's default block_size: one fp32 absmax per block and moment
NF4_BLOCK = 64  # quantize_nf4's default block_size
LIVE_BUCKETS = (
    4  # ZeRO-2/3 buckets alive at once in a backward without accumulation: 1 filling + 2 reducing + 1
)
STATE_CACHE_LIMIT = 20_000  # memoised model states kept before the cache is cleared (planner sweeps)
UNIT_STRIDE = 1_000_000  # ZeRO-3 unit numbers of successive chunks: more units than any chunk has


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
    expert: bool = False  # a routed expert's (sharded over ep; ZeRO state over the dp / ep replicas)


def nf4_bytes(numel: int) -> int:
    """Bytes of `quantize_nf4` with double quantization: packed codes, 8-bit absmaxes, their scales, mean."""
    blocks = -(-numel // NF4_BLOCK)
    groups = -(-blocks // 256)
    return blocks * NF4_BLOCK // 2 + blocks + groups * 4 + 4


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


def _swiglu(prefix: str, width: int, h: int, tp: int, unit: int, lora) -> list[TensorSpec]:
    out = []
    for name in ("gate_proj", "up_proj"):
        out += _linear(prefix + name, width, h, "column", tp, unit, lora)
    return out + _linear(prefix + "down_proj", h, width, "row", tp, unit, lora)


def _mlp_tensors(c: MLAConfig, i: int, tp: int, unit: int, lora, ep: int = 1) -> list[TensorSpec]:
    """Layer i's MLP: dense, or the replicated router (+ V3's frozen correction bias), the shared
    experts and this rank's E / ep routed experts (all held, whatever the routing)."""
    p = f"model.layers.{i}.mlp."
    if not c.is_moe_layer(i):
        return _swiglu(p, c.intermediate_size, c.hidden_size, tp, unit, lora)
    trains = lora is None or not lora.enabled
    out = [TensorSpec(p + "gate.weight", c.n_routed_experts * c.hidden_size, trains, False, True, unit)]
    if c.topk_method == "noaux_tc":
        bias = TensorSpec(p + "gate.e_score_correction_bias", c.n_routed_experts, False, False, False, unit)
        out.append(bias)
    for j in range(c.n_routed_experts // ep):
        experts = _swiglu(f"{p}experts.{j}.", c.moe_intermediate_size, c.hidden_size, tp, unit, lora)
        out += [replace(t, expert=True) for t in experts]
    if c.n_shared_experts:
        width = c.moe_intermediate_size * c.n_shared_experts
        out += _swiglu(p + "shared_experts.", width, c.hidden_size, tp, unit, lora)
    return out


def model_tensors(mcfg: MLAConfig, tp: int, stage: StageSpec, lora=None, ep: int = 1) -> list[TensorSpec]:
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
        out += _mlp_tensors(c, i, tp, unit, lora, ep)
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


_STATE_CACHE: dict[tuple, tuple[dict[str, int], dict[str, int], int, tuple[int, ...]]] = {}


def _state_key(config: Config, mcfg: MLAConfig, pp_rank: int) -> tuple:
    dc, lc = config.distributed, config.lora
    lora = (lc.r, str(lc.targets), lc.quantize_base) if lc.enabled else None
    layout = (
        dc.tp or 1,
        (dc.dp or 1) * dc.cp,
        dc.pp,
        dc.ep,
        dc.virtual_stages,
        str(dc.pp_layers),
        dc.zero_stage,
    )
    options = (dc.offload_optimizer, dc.bucket_cap_mb, config.optim.name, config.train.precision, lora)
    return (json.dumps(mcfg.to_dict(), sort_keys=True), pp_rank, *layout, *options)


def model_state(
    config: Config, mcfg: MLAConfig, pp_rank: int
) -> tuple[dict[str, int], dict[str, int], int, tuple[int, ...]]:
    """(device bytes by part, host bytes by part, resting state, ZeroOptimizer bucket sizes) of one
    pipeline rank; memoised."""
    key = _state_key(config, mcfg, pp_rank)
    if key not in _STATE_CACHE:
        if len(_STATE_CACHE) > STATE_CACHE_LIMIT:
            _STATE_CACHE.clear()
        _STATE_CACHE[key] = _model_state(config, mcfg, pp_rank)
    device, host, resting, buckets = _STATE_CACHE[key]
    return dict(device), dict(host), resting, buckets


def _model_state(config: Config, mcfg: MLAConfig, pp_rank: int):
    dc, tc = config.distributed, config.train
    tp, dp = dc.tp or 1, (dc.dp or 1) * dc.cp  # ZeRO shards over dp x cp
    w = 2 if tc.precision in ("bf16", "fp16") else 4
    chunks = list(rank_stages(config, mcfg, pp_rank).values())
    lora = config.lora if config.lora.enabled else None
    # ZeRO-3 units are per chunk (a chunk's embedding, layers, norm and head): number them globally
    tensors = [
        replace(t, unit=ci * UNIT_STRIDE + t.unit)
        for ci, spec in enumerate(chunks)
        for t in model_tensors(mcfg, tp, spec, lora, dc.ep)
    ]
    trainable = [t for t in tensors if t.trainable]
    frozen = [t for t in tensors if not t.trainable]
    opt = config.optim.name
    layers = sum(s.layer_end - s.layer_start for s in chunks)

    device: dict[str, int] = {}
    host: dict[str, int] = {}
    frozen_dense = w * sum(t.numel for t in frozen if t.nf4_bytes is None)
    nf4 = sum(t.nf4_bytes for t in frozen if t.nf4_bytes is not None)
    buffers = layers * 2 * mcfg.max_seq_len * (mcfg.qk_rope_head_dim // 2) * w
    moe = sum(mcfg.is_moe_layer(i) for s in chunks for i in range(s.layer_start, s.layer_end))
    buffers += moe * (2 * (mcfg.n_routed_experts or 0) + 2) * w  # routing statistics
    p_train = sum(t.numel for t in trainable)
    state: dict[str, int] = {}
    transient_grads = 0
    sizes: list[int] = []
    if not uses_zero(config):
        state["parameters"] = w * p_train
        state["gradients"] = 4 * p_train
        state["optimizer state"] = sum(_optimizer_bytes(t.numel, opt) for t in trainable)
        state["optimizer state"] += ADAM8_TABLES if opt == "adamw8bit" else 0
        where = {}
    else:
        align = BLOCK_8BIT if opt == "adamw8bit" else 1
        sizes, shards = [], []
        # dense buckets shard over dp, expert buckets over the dp / ep ranks holding the same experts
        for expert, n_shards in ((False, dp), (True, dp // dc.ep)):
            n_shards = 1 if dc.zero_stage == 0 else n_shards  # stage 0 keeps master and state whole
            group = [t for t in trainable if t.expert == expert]
            planned = zero_buckets(group, n_shards, dc.bucket_cap_mb, dc.zero_stage == 3, align)
            sizes += planned
            shards += [s // n_shards for s in planned]
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
    dc = config.distributed
    tp = dc.tp or 1
    chunks = list(rank_stages(config, mcfg, pp_rank).values())
    device, host, resting, buckets = model_state(config, mcfg, pp_rank)
    numel = sum(t.numel for spec in chunks for t in model_tensors(mcfg, tp, spec, ep=dc.ep))
    est = MemoryEstimate(pp_rank, device, host, resting, 4 * numel)
    _, m = batch_split(config, dc.dp or 1)
    if dc.zero_stage >= 2 and buckets:  # full fp32 buckets exist only while backward fills them
        accumulating = m > 1 or dc.pp > 1  # no_sync: every bucket accumulates until the last backward
        live = sum(buckets) if accumulating else sum(sorted(buckets)[-LIVE_BUCKETS:])
        est.device["gradient buckets in backward"] = 4 * live
    est.device.update(activation_bytes(config, mcfg, pp_rank, attention))
    return est


def estimate_memory(config: Config, mcfg: MLAConfig, attention: str = "efficient") -> MemoryEstimate:
    """The estimate of the pipeline rank that needs the most device memory."""
    ranks = [estimate_rank(config, mcfg, r, attention) for r in range(config.distributed.pp)]
    return max(ranks, key=lambda est: est.total)
