"""DataParallel against one process computing the same global batch.

Tolerances: in fp32, gradients to rtol=1e-6, atol=1e-7 (the dp average sums in a different order than the
single-process batch mean). Trajectories of 5 AdamW steps are compared in fp64 to 1e-10: Adam divides by
sqrt(v), which turns a last-bit fp32 difference on a near-zero gradient into an update difference of
order lr, so fp32 weights cannot be held to a tight bound; fp64 removes that noise and any real error
(a missing bucket, a wrong average, an extra reduction) is still orders of magnitude above 1e-10.
"""

import pytest
import torch
from dist_harness import grid, run_distributed

from models import MLAConfig, MLATransformer
from parallel import DataParallel, full_tensor, gather_tensor
from parallel.tensor import tp_dim

TOL = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.float64: dict(rtol=1e-10, atol=1e-10)}
CONFIG = MLAConfig(
    vocab_size=257,
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


def _batches(steps: int, global_batch: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return [
        torch.randint(0, CONFIG.vocab_size, (global_batch, 13), generator=generator) for _ in range(steps)
    ]


def _reference(batches, micro: int, dtype: torch.dtype):
    torch.manual_seed(5)
    model = MLATransformer(CONFIG).to(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    history = []
    for batch in batches:
        optimizer.zero_grad()
        for chunk in batch.chunk(micro):
            (model.loss(chunk[:, :-1], chunk[:, 1:]) / micro).backward()
        history.append(({n: p.grad.clone() for n, p in model.named_parameters()}, None))
        optimizer.step()
        history[-1] = (history[-1][0], {n: p.detach().clone() for n, p in model.named_parameters()})
    return history


def _check_data_parallel(dp: int, tp: int, micro: int, bucket_cap_mb: float, dtype: torch.dtype) -> None:
    tol = TOL[dtype]
    batches = _batches(steps=5 if dtype == torch.float64 else 1, global_batch=4 * dp)
    expected = _reference(batches, micro, dtype)
    with grid(dp=dp, tp=tp) as topo:
        torch.manual_seed(5)
        module = MLATransformer(CONFIG, topo).to(dtype)
        model = DataParallel(module, topo.dp_group, bucket_cap_mb=bucket_cap_mb)
        assert tp > 1 or len(model.buckets) > 1, "the test must exercise several buckets"
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for batch, (ref_grads, ref_weights) in zip(batches, expected, strict=True):
            local = batch.chunk(dp)[topo.dp_rank]
            optimizer.zero_grad()
            chunks = local.chunk(micro)
            for i, chunk in enumerate(chunks):
                loss = model.loss(chunk[:, :-1], chunk[:, 1:]) / micro
                if i < len(chunks) - 1:
                    with model.no_sync():
                        loss.backward()
                else:
                    loss.backward()
            for name, p in model.module.named_parameters():
                dim = tp_dim(p)
                grad = p.grad if dim is None else gather_tensor(p.grad, dim, p.tp_full_size, topo.tp_group)
                torch.testing.assert_close(grad, ref_grads[name], **tol, msg=lambda m, n=name: f"{n}: {m}")
            optimizer.step()
            if dtype == torch.float32:
                continue
            for name, p in model.module.named_parameters():
                torch.testing.assert_close(full_tensor(p, topo.tp_group), ref_weights[name], **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("micro", [1, 2])
def test_data_parallel_matches_single_process(micro, dtype):
    run_distributed(2, _check_data_parallel, dp=2, tp=1, micro=micro, bucket_cap_mb=0.01, dtype=dtype)


def test_data_parallel_composes_with_tensor_parallel():
    run_distributed(4, _check_data_parallel, dp=2, tp=2, micro=2, bucket_cap_mb=25, dtype=torch.float64)


def _check_no_sync_communicates_nothing() -> None:
    import torch.distributed as dist

    with grid(dp=2) as topo:
        torch.manual_seed(5)
        model = DataParallel(MLATransformer(CONFIG, topo), topo.dp_group, bucket_cap_mb=0.01)
        batch = _batches(1, 4)[0].chunk(2)[topo.dp_rank]
        calls = []
        original = dist.all_reduce
        dist.all_reduce = lambda *a, **k: calls.append(1) or original(*a, **k)
        try:
            with model.no_sync():
                model.loss(batch[:, :-1], batch[:, 1:]).backward()
        finally:
            dist.all_reduce = original
        assert calls == [], "no_sync must not communicate"
        grad = model.module.lm_head.weight.grad
        copies = [torch.empty_like(grad) for _ in range(2)]
        dist.all_gather(copies, grad, group=topo.dp_group)
        assert not torch.equal(copies[0], copies[1]), "inside no_sync gradients must stay local"


def test_no_sync_keeps_gradients_local():
    run_distributed(2, _check_no_sync_communicates_nothing)
