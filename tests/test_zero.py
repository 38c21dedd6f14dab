"""ZeroOptimizer (stages 0-2, offload) against plain AdamW, and fp16 loss scaling.

Tolerances:
- against one process running AdamW on the global batch: fp64, atol 1e-9 / rtol 1e-7 — the dp average
  sums in another order than the single-process batch mean (~1e-16 relative in fp64); Adam's division
  by sqrt(v) turns that into up to ~1e-10 on entries whose gradient is ~0 (rows of absent tokens), still
  seven orders of magnitude below any real error (a lost bucket or a wrong average moves weights by ~lr);
- against DataParallel + AdamW at the same dp in fp32: bit-exact — the same gradients reach the same
  element-wise update, only sharded;
- offload against no offload: bit-exact — the same arithmetic, on another device (CPU here).
"""

import pytest
import torch
import torch.distributed as dist
from dist_harness import grid, run_distributed

from models import MLAConfig, MLATransformer
from models.transformer import split_layers
from parallel import DataParallel, full_tensor
from parallel.data import ZeroOptimizer
from parallel.data.zero3 import default_units
from parallel.lowbit.loss_scaler import DynamicLossScaler
from parallel.pipeline.executor import PipelineExecutor

CONFIG = MLAConfig(
    vocab_size=131,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    intermediate_size=64,
    max_seq_len=16,
)
ADAM = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
STEPS = 4
FP64_TOL = dict(rtol=1e-7, atol=1e-9)


def _batches(global_batch: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, CONFIG.vocab_size, (global_batch, 9), generator=g) for _ in range(STEPS)]


def _reference(batches, micro: int, clip: float):
    torch.manual_seed(1)
    model = MLATransformer(CONFIG).double()
    opt = torch.optim.AdamW(model.parameters(), **ADAM)
    weights = []
    for batch in batches:
        opt.zero_grad()
        for chunk in batch.chunk(micro):
            (model.loss(chunk[:, :-1], chunk[:, 1:]) / micro).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    names = [n for n, _ in model.named_parameters()]
    state = {names[i]: s for i, s in enumerate(opt.state_dict()["state"].values())}
    return weights, state


def _check_against_single_process(
    dp: int, tp: int, stage: int, micro: int, clip: float, offload: bool, recompute: bool = False
) -> None:
    batches = _batches(4 * dp)
    expected, expected_state = _reference(batches, micro, clip)
    with grid(dp=dp, tp=tp) as topo:
        torch.manual_seed(1)
        model = MLATransformer(CONFIG, topo).double()
        model.set_recompute(recompute)
        units = default_units(model) if stage == 3 else None
        opt = ZeroOptimizer(
            model.parameters(), torch.optim.AdamW, stage, topo.dp_group, offload, 0.01, units, **ADAM
        )
        assert len(opt.buckets) > 2, "several buckets must be exercised"
        for batch, weights in zip(batches, expected, strict=True):
            opt.zero_grad()
            chunks = batch.chunk(dp)[topo.dp_rank].chunk(micro)
            for i, chunk in enumerate(chunks):
                sync = opt.no_sync() if i < len(chunks) - 1 else _nullcontext()
                with sync:
                    (model.loss(chunk[:, :-1], chunk[:, 1:]) / micro).backward()
            opt.clip_grad_norm_(clip, topo.tp_group)
            opt.step()
            whole = opt.sharding.gathered_parameters() if stage == 3 else _nullcontext()
            with whole:
                for name, p in model.named_parameters():
                    torch.testing.assert_close(full_tensor(p, topo.tp_group), weights[name], **FP64_TOL)
        if tp == 1:
            state = opt.consolidated_state_dict()
            for index, (name, _) in enumerate(model.named_parameters()):
                for key in ("exp_avg", "exp_avg_sq"):
                    torch.testing.assert_close(state[index][key], expected_state[name][key], **FP64_TOL)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("dp", [2, 4])
def test_zero_matches_single_process_adamw(stage, dp):
    run_distributed(
        dp, _check_against_single_process, dp=dp, tp=1, stage=stage, micro=1, clip=0.0, offload=False
    )


def test_zero_with_accumulation_and_clipping():
    run_distributed(2, _check_against_single_process, dp=2, tp=1, stage=2, micro=2, clip=0.05, offload=False)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_with_tensor_parallel_accumulation_and_clipping(stage):
    run_distributed(
        4, _check_against_single_process, dp=2, tp=2, stage=stage, micro=2, clip=0.05, offload=False
    )


def test_zero3_with_accumulation_clipping_and_offload():
    run_distributed(2, _check_against_single_process, dp=2, tp=1, stage=3, micro=2, clip=0.05, offload=True)


def test_zero3_with_activation_recompute():
    # recompute runs a layer's forward inside backward: no prefetch may carry weights across a step
    run_distributed(
        2,
        _check_against_single_process,
        dp=2,
        tp=1,
        stage=3,
        micro=1,
        clip=0.0,
        offload=False,
        recompute=True,
    )


def _check_zero3_keeps_only_shards() -> None:
    with grid(dp=2) as topo:
        torch.manual_seed(1)
        model = MLATransformer(CONFIG, topo)
        total = sum(p.numel() for p in model.parameters())
        opt = ZeroOptimizer(
            model.parameters(), torch.optim.AdamW, 3, topo.dp_group, units=default_units(model), lr=1e-3
        )
        assert sum(p.numel() for p in model.parameters()) == 0, "between steps no parameter is whole"
        shards = sum(b.param_chunk.numel() for b in opt.buckets)
        assert total / 2 <= shards <= total / 2 + 2 * len(opt.buckets)
        batch = _batches(4)[0].chunk(2)[topo.dp_rank]
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        # autograd holds views of the weights (weight.t()) until backward: the storage itself is freed
        held = [b.gathered_flat.untyped_storage().nbytes() for b in opt.buckets]
        assert held == [0] * len(opt.buckets), "after forward no gathered storage is alive"
        loss.backward()
        assert sum(p.numel() for p in model.parameters()) == 0, "after backward every unit is freed again"
        assert all(b.grad is None for b in opt.buckets), "stage 3 keeps no full gradient"
        assert all(b.gathered_flat.untyped_storage().nbytes() == 0 for b in opt.buckets)
        opt.step()
        opt.zero_grad()
        assert all(m.grad is None for m in opt.masters), "no gradient is held between steps"


def test_zero3_frees_parameters_between_uses():
    run_distributed(2, _check_zero3_keeps_only_shards)


def test_zero_with_offload():
    run_distributed(2, _check_against_single_process, dp=2, tp=1, stage=1, micro=1, clip=0.0, offload=True)


def _check_bit_exact_against_data_parallel(stage: int) -> None:
    batches = _batches(8)
    with grid(dp=2) as topo:
        torch.manual_seed(1)
        ref = MLATransformer(CONFIG, topo)
        ref_dp = DataParallel(ref, topo.dp_group)
        ref_opt = torch.optim.AdamW(ref.parameters(), **ADAM)
        torch.manual_seed(1)
        model = MLATransformer(CONFIG, topo)
        opt = ZeroOptimizer(model.parameters(), torch.optim.AdamW, stage, topo.dp_group, **ADAM)
        offloaded_model = MLATransformer(CONFIG, topo)
        offloaded_model.load_state_dict(model.state_dict())
        offloaded = ZeroOptimizer(
            offloaded_model.parameters(), torch.optim.AdamW, stage, topo.dp_group, True, **ADAM
        )
        for batch in batches:
            local = batch.chunk(2)[topo.dp_rank]
            for m, o in ((ref_dp, ref_opt), (model, opt), (offloaded_model, offloaded)):
                o.zero_grad()
                m.loss(local[:, :-1], local[:, 1:]).backward()
                o.step()
        for (name, a), b, c in zip(
            ref.named_parameters(), model.parameters(), offloaded_model.parameters(), strict=True
        ):
            assert torch.equal(a, b), f"{name}: ZeRO differs from DataParallel + AdamW"
            assert torch.equal(b, c), f"{name}: offload differs from no offload"


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_is_bit_exact_with_data_parallel_adamw_and_offload(stage):
    run_distributed(2, _check_bit_exact_against_data_parallel, stage)


def _check_zero_with_pipeline() -> None:
    batches = _batches(8)
    expected, _ = _reference(batches, 2, 0.0)
    with grid(dp=2, pp=2) as topo:
        specs = split_layers(CONFIG.num_layers, 2)
        torch.manual_seed(1)
        chunk = MLATransformer(CONFIG, topo, specs[topo.pp_rank]).double()
        opt = ZeroOptimizer(
            chunk.parameters(), torch.optim.AdamW, 2, topo.dp_group, bucket_cap_mb=0.01, **ADAM
        )
        executor = PipelineExecutor({topo.pp_rank: chunk}, topo, "1f1b", 2)
        for batch, weights in zip(batches, expected, strict=True):
            opt.zero_grad()
            micro = batch.chunk(2)[topo.dp_rank].chunk(2)
            with opt.no_sync():
                executor.step(
                    [m[:, :-1] for m in micro], [m[:, 1:] for m in micro], (2, 8, 32), torch.float64, 0.5
                )
            opt.sync_gradients()
            opt.step()
            for name, p in chunk.named_parameters():
                torch.testing.assert_close(p, weights[name], **FP64_TOL)


def test_zero_with_pipeline_parallel():
    run_distributed(4, _check_zero_with_pipeline)


def test_bf16_model_keeps_fp32_master_weights():
    model = MLATransformer(CONFIG).to(torch.bfloat16)
    opt = ZeroOptimizer(model.parameters(), torch.optim.SGD, 0, None, lr=1e-4)
    assert all(m.dtype == torch.float32 for m in opt.masters)
    before = [m.clone() for m in opt.masters]
    weights_before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.sync_gradients()
    opt.step()
    moved = [not torch.equal(a, b) for a, b in zip(before, opt.masters, strict=True)]
    assert all(moved), "every master shard takes the small update"
    unchanged = [torch.equal(a, p) for a, p in zip(weights_before, model.parameters(), strict=True)]
    assert any(unchanged), "a 1e-4 step is below bf16 resolution for weights ~1: only the master keeps it"


def test_fp16_inf_gradient_skips_the_step_and_backs_off():
    model = MLATransformer(CONFIG)
    opt = ZeroOptimizer(model.parameters(), torch.optim.AdamW, 0, None, lr=1e-3)
    scaler = DynamicLossScaler(init_scale=1024.0)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    params[3].grad[0] = float("inf")
    opt.sync_gradients()
    norm = opt.clip_grad_norm_(1.0)
    assert scaler.update(norm.item()) is True
    assert scaler.scale == 512.0 and scaler.skipped_steps == 1
    assert scaler.update(1.0) is False


def test_bad_stage_and_non_elementwise_optimizer_are_rejected():
    params = list(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match="distributed.zero_stage=5"):
        ZeroOptimizer(params, torch.optim.AdamW, 5)
    with pytest.raises(ValueError, match="stage 3 needs `units`"):
        ZeroOptimizer(params, torch.optim.AdamW, 3)
    with pytest.raises(ValueError, match="LBFGS cannot be sharded"):
        ZeroOptimizer(params, torch.optim.LBFGS, 1)


def _touch_dist():
    return dist.is_initialized()


def _check_adamw8bit_sharding_is_invisible(stage: int) -> None:
    from parallel.lowbit.adamw8bit import AdamW8bit

    batches = _batches(8)
    with grid(dp=2) as topo:
        models, optimizers = [], []
        for s in (0, stage):  # stage 0: every rank holds the whole 8-bit state
            torch.manual_seed(1)
            model = MLATransformer(CONFIG, topo)
            units = default_units(model) if stage == 3 else None  # the same buckets for both
            opt = ZeroOptimizer(
                model.parameters(),
                AdamW8bit,
                s,
                topo.dp_group,
                False,
                0.01,
                units,
                lr=1e-2,
                min_8bit_size=256,
            )
            models.append(model)
            optimizers.append(opt)
        for batch in batches:
            local = batch.chunk(2)[topo.dp_rank]
            for model, opt in zip(models, optimizers, strict=True):
                opt.zero_grad()
                model.loss(local[:, :-1], local[:, 1:]).backward()
                opt.step()
        whole = optimizers[1].sharding.gathered_parameters() if stage == 3 else _nullcontext()
        with whole:
            for (name, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
                assert torch.equal(a, b), f"{name}: sharded 8-bit state differs from unsharded"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_adamw8bit_under_zero_equals_unsharded_8bit(stage):
    # chunks hold whole quantization blocks, so the blocks are the same for any dp: bit-exact
    run_distributed(2, _check_adamw8bit_sharding_is_invisible, stage)


def _check_adamw8bit_keeps_replicated_parameters_identical_across_tp() -> None:
    from parallel.lowbit.adamw8bit import AdamW8bit
    from parallel.tensor import tp_dim

    with grid(dp=2, tp=2) as topo:
        torch.manual_seed(1)
        model = MLATransformer(CONFIG, topo)
        opt = ZeroOptimizer(model.parameters(), AdamW8bit, 1, topo.dp_group, lr=1e-2, min_8bit_size=256)
        for batch in _batches(8)[:3]:
            local = batch.chunk(2)[topo.dp_rank]
            opt.zero_grad()
            model.loss(local[:, :-1], local[:, 1:]).backward()
            opt.step()
        for name, p in model.named_parameters():
            if tp_dim(p) is None:
                copies = [torch.empty_like(p) for _ in range(2)]
                dist.all_gather(copies, p.detach(), group=topo.tp_group)
                assert torch.equal(copies[0], copies[1]), f"{name}: replicated parameter drifted across TP"


def test_adamw8bit_under_zero_keeps_tp_replicas_identical():
    # a quantization block must never mix TP-sharded and replicated elements
    run_distributed(4, _check_adamw8bit_keeps_replicated_parameters_identical_across_tp)
