"""Pipeline schedules (pure Python, no processes) and the executor against one process.

Executor tolerance: rtol=1e-6, atol=1e-9 in fp32. Pipelining moves no sums across ranks; the only
difference is that the zero-bubble W step computes dW = dY^T X as its own matmul, which may round
differently from autograd's. Composed with TP, the TP tolerance applies (rtol=1e-5, atol=1e-6: TP
all-reduces change the order of sums, see test_mla_tensor_parallel).
"""

import pytest
import torch
import torch.distributed as dist
from dist_harness import grid, run_distributed

from models import MLAConfig, MLATransformer
from models.transformer import split_layers
from parallel.pipeline.executor import PipelineExecutor
from parallel.pipeline.schedules import (
    Action,
    bubble_formula,
    build_schedule,
    schedule_1f1b,
    simulate,
)
from parallel.tensor import gather_tensor, tp_dim

# ------------------------------------------------------------------ schedules, no processes


@pytest.mark.parametrize("p", range(1, 9))
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13, 32])
def test_gpipe_and_1f1b_meet_the_bubble_formula(p, m):
    for name in ("gpipe", "1f1b"):
        sim = simulate(build_schedule(name, p, m))
        assert sim.bubble == pytest.approx(bubble_formula(name, p, m), abs=1e-12)
    assert max(simulate(build_schedule("1f1b", p, m)).peak_in_flight) <= min(p, m)
    assert simulate(build_schedule("gpipe", p, m)).peak_in_flight == [m] * p


@pytest.mark.parametrize("p", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("v", [2, 3])
def test_interleaved_meets_its_bubble_formula(p, k, v):
    m = k * p
    sim = simulate(build_schedule("interleaved_1f1b", p, m, v), v=v)
    assert sim.bubble == pytest.approx(bubble_formula("interleaved_1f1b", p, m, v), abs=1e-12)
    assert sim.bubble < bubble_formula("1f1b", p, m)


@pytest.mark.parametrize("p", range(1, 9))
@pytest.mark.parametrize("m", [1, 2, 4, 7, 16, 32])
def test_zero_bubble_h1_beats_1f1b_with_the_same_memory(p, m):
    sim = simulate(build_schedule("zb1p", p, m))
    assert max(sim.peak_in_flight) <= min(p, m) + (0 if p > 1 else 0)
    if p > 1:
        assert sim.bubble < bubble_formula("1f1b", p, m)
    if p > 1 and m >= p:  # steady state reached: close to a third of 1F1B's bubble
        assert sim.bubble <= bubble_formula("1f1b", p, m) / 2


def test_validator_finds_a_deadlock():
    schedule = schedule_1f1b(2, 2)
    schedule[1] = [Action("B", 0, 1), Action("F", 0, 1), Action("F", 1, 1), Action("B", 1, 1)]
    with pytest.raises(ValueError, match="comes before its forward"):
        simulate(schedule)
    schedule[1] = [Action("F", 1, 1), Action("F", 0, 1), Action("B", 0, 1), Action("B", 1, 1)]
    schedule[0] = [Action("F", 0, 0), Action("B", 0, 0), Action("F", 1, 0), Action("B", 1, 0)]
    with pytest.raises(RuntimeError, match="deadlocks"):
        simulate(schedule)


def test_validator_finds_a_missing_action():
    schedule = schedule_1f1b(2, 3)
    schedule[0].pop()
    with pytest.raises(ValueError, match="missing"):
        simulate(schedule)


def test_bad_schedule_requests_are_rejected():
    with pytest.raises(ValueError, match="distributed.pp_schedule='zigzag'"):
        build_schedule("zigzag", 2, 4)
    with pytest.raises(ValueError, match="multiple of pp=4"):
        build_schedule("interleaved_1f1b", 4, 6, 2)
    with pytest.raises(ValueError, match="virtual_stages >= 2"):
        build_schedule("interleaved_1f1b", 2, 4, 1)
    with pytest.raises(ValueError, match="too few for 5 pipeline stages"):
        split_layers(4, 5)


def test_layer_split_is_balanced_and_overridable():
    # 10 = 4 x 2 + 2: the two middle stages take the extra layers
    assert [(s.layer_start, s.layer_end) for s in split_layers(10, 4)] == [(0, 2), (2, 5), (5, 8), (8, 10)]
    specs = split_layers(6, 3, [1, 3, 2])
    assert [(s.layer_start, s.layer_end, s.is_first, s.is_last) for s in specs] == [
        (0, 1, True, False),
        (1, 4, False, False),
        (4, 6, False, True),
    ]
    with pytest.raises(ValueError, match="pp_layers"):
        split_layers(6, 3, [1, 1, 1])


# ------------------------------------------------------------------ executor against one process

CONFIG = MLAConfig(
    vocab_size=203,
    hidden_size=32,
    num_layers=8,
    num_heads=4,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    intermediate_size=64,
    max_seq_len=16,
)
TOL = {1: dict(rtol=1e-6, atol=1e-9), 2: dict(rtol=1e-5, atol=1e-6)}  # by tp


def _reference(batch: torch.Tensor, m: int):
    torch.manual_seed(9)
    model = MLATransformer(CONFIG)
    total = 0.0
    for micro in batch.chunk(m):
        loss = model.loss(micro[:, :-1], micro[:, 1:]) / m
        loss.backward()
        total += loss.item()
    return total, {n: p.grad for n, p in model.named_parameters()}


def _check_pipeline(pp: int, tp: int, schedule: str, m: int, v: int) -> None:
    batch = torch.randint(0, CONFIG.vocab_size, (2 * m, 11), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = _reference(batch, m)
    with grid(pp=pp, tp=tp) as topo:
        specs = split_layers(CONFIG.num_layers, pp * v)
        chunks = {}
        for c in range(v):
            stage = c * pp + topo.pp_rank
            torch.manual_seed(9)
            chunks[stage] = MLATransformer(CONFIG, topo, specs[stage])
        executor = PipelineExecutor(chunks, topo, schedule, m, v)
        micro = batch.chunk(m)
        inputs = [x[:, :-1] for x in micro]
        targets = [x[:, 1:] for x in micro]
        loss = executor.step(inputs, targets, (2, 10, CONFIG.hidden_size), torch.float32, loss_scale=1 / m)
        dist.all_reduce(loss, group=topo.pp_group)  # only the last stage holds it
        torch.testing.assert_close(loss.item(), ref_loss, rtol=TOL[tp]["rtol"], atol=0)
        for chunk in chunks.values():
            for name, p in chunk.named_parameters():
                dim = tp_dim(p)
                grad = p.grad if dim is None else gather_tensor(p.grad, dim, p.tp_full_size, topo.tp_group)
                torch.testing.assert_close(
                    grad, ref_grads[name], **TOL[tp], msg=lambda msg, n=name: f"{n}: {msg}"
                )
        if executor.store is not None:
            assert executor.store.pending() == 0


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb1p"])
@pytest.mark.parametrize("pp", [2, 4])
def test_schedules_match_single_process(schedule, pp):
    run_distributed(pp, _check_pipeline, pp=pp, tp=1, schedule=schedule, m=4, v=1)


@pytest.mark.parametrize("pp", [2, 4])
def test_interleaved_with_two_virtual_stages_matches_single_process(pp):
    run_distributed(pp, _check_pipeline, pp=pp, tp=1, schedule="interleaved_1f1b", m=pp * 2, v=2)


def test_fewer_microbatches_than_stages_work():
    run_distributed(4, _check_pipeline, pp=4, tp=1, schedule="1f1b", m=2, v=1)


def test_pipeline_composes_with_tensor_parallel():
    run_distributed(4, _check_pipeline, pp=2, tp=2, schedule="zb1p", m=4, v=1)
