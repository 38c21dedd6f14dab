"""Expert parallelism against one process: the routed experts split over ep ranks, tokens moved by
all-to-all, gradients reduced over the expert-data-parallel group.

Tolerance: fp32 throughout; the expert-parallel run adds the same products in another order (the dp
all-reduce of dense gradients, the edp all-reduce of expert gradients, experts run on other row blocks),
so loss, gradients and AdamW-updated parameters agree to 1e-6 relative (the fp32 reduction rung). AdamW
runs at lr 1e-4: it normalises each element, so a near-zero gradient element, whose reduction-order
difference is large relative to itself, moves by up to ~lr more or less (seen: 2e-6 at lr 1e-3); at 1e-4
that stays under the 1e-6 of the comparison while each step still moves every parameter by ~1e-4.
"""

import contextlib

import pytest
import torch
from dist_harness import grid, run_distributed
from safetensors.torch import load_file
from test_moe import MOE, SMALL

from models.config import MLAConfig
from models.moe import routing_statistics, update_router_bias
from models.transformer import MLATransformer
from parallel.data import DataParallel, ZeroOptimizer
from parallel.data.zero3 import default_units
from parallel.experts import all_to_all, dispatch, is_expert_parameter
from parallel.grad_clip import clip_grad_norm_
from parallel.lowbit.adamw8bit import AdamW8bit
from parallel.lowbit.lora import apply_lora, save_adapter

ROWS, SEQ, STEPS = 2, 12, 3


def _model(config, topo, uneven, lora=False):
    model = MLATransformer(config, topo)
    model.reset_parameters(seed=7)
    if lora:  # QLoRA on the routed experts (NF4 bases) and on o_proj
        apply_lora(model, ["experts.*.gate_proj", "experts.*.down_proj", "o_proj"], 4, 8, 0.0, "nf4", seed=3)
    if uneven:  # experts 0-2 are never chosen (noaux_tc chooses by score + bias): they get no tokens
        with torch.no_grad():
            model.model.layers["1"].mlp.gate.e_score_correction_bias[:3] = -100.0
    return model


def _optimizer(model, topo, zero_stage, eightbit=False):
    hyper = dict(lr=1e-4, weight_decay=0.1)
    units = default_units(model) if zero_stage == 3 else None
    if eightbit:  # small blocks, so that these tiny matrices get 8-bit state
        return AdamW8bit(model.parameters(), block_size=64, min_8bit_size=64, **hyper)
    if zero_stage is None:
        return torch.optim.AdamW(model.parameters(), **hyper)
    return ZeroOptimizer(
        model.parameters(),
        torch.optim.AdamW,
        zero_stage,
        topo.dp_group,
        units=units,
        expert_group=topo.edp_group,
        **hyper,
    )


def _train(model, ids, topo, zero_stage=None, eightbit=False):
    """STEPS AdamW steps with clipping and the router-bias update; (first loss, first grads, norms)."""
    opt = _optimizer(model, topo, zero_stage, eightbit)
    if zero_stage:  # expert state sharded over the expert-data-parallel group, dense over dp
        assert {b.shards for b in opt.buckets} == {topo.edp_size, topo.dp_size}
    if topo is not None and zero_stage is None:
        DataParallel(model, topo.dp_group, expert_group=topo.edp_group)  # hooks reduce in backward
    ep_group = topo.ep_group if topo is not None else None
    first, norms = None, []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = model.loss(ids, torch.roll(ids, -1, 1))
        loss.backward()
        if first is None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            first = (loss.detach().clone(), grads)
        if isinstance(opt, ZeroOptimizer):
            norms.append(opt.clip_grad_norm_(0.5, None, None, ep_group))
        else:
            norms.append(clip_grad_norm_(model.parameters(), 0.5, None, None, ep_group))
        opt.step()
        update_router_bias(model, 1e-2, topo.dp_group if topo is not None else None)
    return first, norms, opt


def _ep_matches_one_process(
    dp: int, ep: int, uneven: bool, zero_stage=None, eightbit=False, adapters: str | None = None
) -> None:
    config = MLAConfig(**SMALL, **MOE)
    ids = torch.randint(0, 96, (dp * ROWS, SEQ), generator=torch.Generator().manual_seed(2))
    reference = _model(config, None, uneven, lora=adapters is not None)
    (ref_loss, ref_grads), ref_norms, _ = _train(reference, ids, None, eightbit=eightbit)
    ref_stats = routing_statistics(reference)["moe_tokens_per_expert"]["model.layers.1.mlp"]
    with grid(dp=dp, ep=ep) as topo:
        model = _model(config, topo, uneven, lora=adapters is not None)
        assert len(model.model.layers["1"].mlp.experts) == 8 // ep  # n_routed_experts / ep held here
        rows = ids[topo.dp_rank * ROWS : (topo.dp_rank + 1) * ROWS]
        (loss, grads), norms, opt = _train(model, rows, topo, zero_stage, eightbit)
        torch.distributed.all_reduce(loss, group=topo.dp_group)
        assert torch.allclose(loss / dp, ref_loss, rtol=1e-6), (loss / dp, ref_loss)
        if zero_stage is None:  # (ZeRO keeps the reduced gradients in its shards)
            assert set(grads) == {n for n in ref_grads if ".experts." not in n or n in grads}
            for name, g in grads.items():
                scale = ref_grads[name].abs().max()
                assert (g - ref_grads[name]).abs().max() <= 1e-6 * scale + 1e-9, name
        for norm, ref in zip(norms, ref_norms, strict=True):  # each expert counted once
            assert torch.allclose(norm, ref, rtol=1e-6), (norm, ref)
        ref_params = dict(reference.named_parameters())
        # 8-bit moments: a last-bit gradient difference can pick the neighbouring code of a block, which
        # moves that element by a fraction of lr = 1e-4 (seen: over 1e-6, under 1e-5 of the largest weight)
        tolerance = 1e-5 if eightbit else 1e-6
        whole = opt.sharding.gathered_parameters() if zero_stage == 3 else contextlib.nullcontext()
        with whole:  # ZeRO-3 keeps only shards between steps
            for name, p in model.named_parameters():
                assert (p - ref_params[name]).abs().max() <= tolerance * ref_params[name].abs().max(), name
        stats = routing_statistics(model, topo.dp_group)["moe_tokens_per_expert"]["model.layers.1.mlp"]
        assert stats == ref_stats
        if uneven:
            assert stats[:3] == [0, 0, 0]
        assert all(is_expert_parameter(p) for n, p in model.named_parameters() if ".experts." in n)
        if adapters is not None:  # the PEFT file holds every expert's adapters, as one process writes it
            save_adapter(model, f"{adapters}/ep", None, None, topo.ep_group)
            save_adapter(reference, f"{adapters}/one")
            if topo.rank == 0:
                ours, theirs = (load_file(f"{adapters}/{d}/adapter_model.safetensors") for d in ("ep", "one"))
                assert ours.keys() == theirs.keys() and any(".experts.7." in k for k in ours)
                for key, t in theirs.items():
                    assert (ours[key] - t).abs().max() <= 1e-6 * t.abs().max(), key


@pytest.mark.parametrize("ep", [2, 4])
def test_expert_parallel_equals_one_process(ep):
    run_distributed(4, _ep_matches_one_process, dp=4, ep=ep, uneven=ep == 4)


def test_expert_parallel_with_adamw8bit_equals_one_process():
    """Without ZeRO the 8-bit blocks are per parameter, so they are the same as in one process."""
    run_distributed(4, _ep_matches_one_process, dp=4, ep=2, uneven=False, eightbit=True)


def test_expert_parallel_with_qlora_on_experts_equals_one_process(tmp_path):
    run_distributed(2, _ep_matches_one_process, dp=2, ep=2, uneven=False, adapters=str(tmp_path))


def _bf16_close_to_fp32() -> None:
    """bf16 weights (fp32 masters in a stage-0 ZeroOptimizer, as the trainer runs bf16) at ep=2: the
    loss and updated weights within 2e-2 of fp32 in one process (the bf16 rung)."""
    config = MLAConfig(**SMALL, **MOE)
    ids = torch.randint(0, 96, (2 * ROWS, SEQ), generator=torch.Generator().manual_seed(2))
    reference = _model(config, None, False)
    (ref_loss, _), _, _ = _train(reference, ids, None)
    with grid(dp=2, ep=2) as topo:
        model = _model(config, topo, False).to(torch.bfloat16)
        rows = ids[topo.dp_rank * ROWS : (topo.dp_rank + 1) * ROWS]
        (loss, _), _, _ = _train(model, rows, topo, zero_stage=0)
        torch.distributed.all_reduce(loss, group=topo.dp_group)
        assert torch.allclose(loss.float() / 2, ref_loss, rtol=2e-2), (loss / 2, ref_loss)
        ref_params = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            if name.endswith("e_score_correction_bias"):  # moved by sign(load differences): bf16 flips some
                continue
            assert (p.float() - ref_params[name]).abs().max() <= 2e-2 * ref_params[name].abs().max(), name


def test_expert_parallel_in_bf16_is_close_to_fp32():
    run_distributed(2, _bf16_close_to_fp32)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_expert_parallel_with_zero_shards_expert_state_over_edp_and_equals_one_process(stage):
    """Stage 3 also shards the expert parameters themselves over edp (gathered per unit)."""
    run_distributed(4, _ep_matches_one_process, dp=4, ep=2, uneven=True, zero_stage=stage)


def _dispatch_closed_form() -> None:
    """Rank r sends r + 1 rows of value r to every rank (variable splits) and gets them back in backward."""
    with grid(dp=2, ep=2) as topo:
        r = topo.ep_rank
        x = torch.full((2 * (r + 1), 1), float(r), requires_grad=True)
        out = all_to_all(x, [1, 2], [r + 1, r + 1], topo.ep_group)
        assert out.view(-1).tolist() == [0.0, 1.0, 1.0]
        (out * torch.arange(1.0, 4.0).unsqueeze(1)).sum().backward()
        # the gradient of each sent row is the weight its receiver gave it
        assert x.grad.view(-1).tolist() == ([1.0, 1.0] if r == 0 else [2.0, 3.0, 2.0, 3.0])
        # a rank whose tokens all go to the other rank's experts, and one that receives nothing
        indices = torch.full((3, 1), 3 if r == 0 else 2)
        rows, plan = dispatch(torch.randn(3, 4), indices, 4, topo.ep_group)
        assert plan.counts == ([0, 0] if r == 0 else [3, 3]) and rows.shape == (0 if r == 0 else 6, 4)


def test_dispatch_moves_rows_with_variable_splits_and_back():
    run_distributed(2, _dispatch_closed_form)


def _step(model, opt, ids, topo) -> None:
    opt.zero_grad(set_to_none=True)
    model.loss(ids, torch.roll(ids, -1, 1)).backward()
    opt.step()


def _saved_at_ep2_resumes_at_ep(directory: str) -> None:
    """Save after one step at ep=2 (ZeRO-1: expert state sharded over edp), resume at ep=1 and ep=4 with
    plain AdamW: the second step equals two steps in one process (1e-6: fp32 reductions, as above)."""
    from parallel import checkpoint

    config = MLAConfig(**SMALL, **MOE)
    ids = torch.randint(0, 96, (4 * ROWS, SEQ), generator=torch.Generator().manual_seed(2))
    reference = _model(config, None, False)
    ref_opt = _optimizer(reference, None, None)
    for _ in range(2):
        _step(reference, ref_opt, ids, None)
    with grid(dp=4, ep=2) as topo:
        model = _model(config, topo, False)
        opt = _optimizer(model, topo, 1)
        _step(model, opt, ids[topo.dp_rank * ROWS : (topo.dp_rank + 1) * ROWS], topo)
        checkpoint.save(directory, model, opt, topology=topo, step=1)
    tensors = checkpoint.read_manifest(directory)["tensors"]
    experts = [name for name in tensors if ".experts." in name]
    assert len(experts) == 8 * 3 * 3  # of every expert's 3 matrices: master, exp_avg, exp_avg_sq
    for name in experts:  # each element written once, not once per expert-data-parallel replica
        pieces = tensors[name]["pieces"]
        written = sum(p["flat"][1] - p["flat"][0] for p in pieces)
        assert written == torch.Size(tensors[name]["shape"]).numel(), name
    for ep in (1, 4):
        with grid(dp=4, ep=ep) as topo:
            model = _model(config, topo, False)
            model.reset_parameters(seed=99)  # the checkpoint, not the init, must set every weight
            opt = _optimizer(model, topo, None)
            DataParallel(model, topo.dp_group, expert_group=topo.edp_group)
            checkpoint.load(directory, model, opt, topology=topo)
            _step(model, opt, ids[topo.dp_rank * ROWS : (topo.dp_rank + 1) * ROWS], topo)
            ref_params = dict(reference.named_parameters())
            for name, p in model.named_parameters():
                assert (p - ref_params[name]).abs().max() <= 1e-6 * ref_params[name].abs().max(), (ep, name)


def test_checkpoint_saved_at_ep2_resumes_at_ep1_and_ep4(tmp_path):
    run_distributed(4, _saved_at_ep2_resumes_at_ep, directory=str(tmp_path / "step-1"))


def test_unsupported_expert_parallel_combinations_are_named_up_front():
    from train.config import load_config
    from train.layout import unsupported

    moe = [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in MOE.items()]
    base = [f"model.{k}={v}" for k, v in SMALL.items()] + moe + ["data.seq_len=16", "distributed.dp=4"]

    def problem(*extra: str) -> str | None:
        config = load_config(None, [*base, *extra])
        return unsupported(config, MLAConfig(**config.model))

    assert problem("distributed.ep=2") is None
    assert "n_routed_experts=6 is not divisible by distributed.ep=4" in problem(
        "distributed.ep=4", "model.n_routed_experts=6", "model.n_group=1", "model.topk_group=1"
    )
    assert problem("distributed.ep=2", "distributed.zero_stage=3") is None
    assert problem("distributed.ep=2", "lora.enabled=true", "lora.quantize_base=nf4") is None
    dense = [a for a in base if not a.startswith("model.n_routed_experts")]
    config = load_config(None, [*dense, "distributed.ep=2"])
    assert "needs a mixture-of-experts model" in unsupported(config, MLAConfig(**config.model))


def _timeouts_after_start_up() -> set[float]:
    from train.faults import set_collective_timeout

    with grid(dp=4, ep=2) as topo:  # ep and edp groups of 2 ranks each
        set_collective_timeout(topo, 7.0)
        groups = (topo.tp_group, topo.dp_group, topo.dp_cp_group, topo.ep_group, topo.edp_group)
        assert topo.ep_group is not None and topo.edp_group is not None
        return {g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for g in groups if g}


def test_steady_state_collective_timeout_reaches_the_expert_groups():
    """After the first step every group, the experts' all-to-all and gradient groups included, times out
    after distributed.timeout_s, not the start-up value (bug: ep and edp kept the start-up timeout)."""
    assert run_distributed(4, _timeouts_after_start_up) == [{7.0}] * 4
