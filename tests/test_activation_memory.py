"""Sequence parallelism and activation recompute change where activations live, never the result.

Sequence parallel at tp 2 against one process: loss and every gradient to rtol=1e-5, atol=1e-6 (the
tolerance of tests/test_mla_tensor_parallel.py: TP reorders the sums of the row-parallel projections, the
embedding and the cross-entropy; SP only replaces all-reduces by reduce-scatter + all-gather of the same
sums). Recompute modes in one process are compared exactly: recomputation replays the same operations on
the same inputs, and dropout masks are replayed from the saved RNG state.
"""

import pytest
import torch
import torch.distributed as dist
from dist_harness import grid, run_distributed

from models import MLAConfig, MLATransformer
from parallel import full_tensor, gather_tensor
from parallel.tensor import tp_dim

TOL = dict(rtol=1e-5, atol=1e-6)


def _config(**overrides) -> MLAConfig:
    base = dict(
        vocab_size=1001,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        q_lora_rank=24,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        intermediate_size=96,
        max_seq_len=32,
    )
    base.update(overrides)
    return MLAConfig(**base)


def _loss_and_grads(model: MLATransformer, inputs, targets):
    model.zero_grad()
    loss = model.loss(inputs, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _check_sequence_parallel(tp: int, overrides: dict, recompute: str) -> None:
    config = _config(**overrides)
    torch.manual_seed(7)
    ids = torch.randint(0, config.vocab_size, (2, 17))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    torch.manual_seed(1234)
    ref = MLATransformer(config)
    ref_loss, ref_grads = _loss_and_grads(ref, inputs, targets)

    with grid(tp=tp) as topo:
        torch.manual_seed(1234)
        model = MLATransformer(config, topo)
        model.set_sequence_parallel(True)
        model.set_recompute(recompute)
        seen = []
        hook = model.model.layers["1"].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
        loss, grads = _loss_and_grads(model, inputs, targets)
        hook.remove()
        assert seen[0] == (2, 16 // tp, config.hidden_size), f"layer input not sequence-sharded: {seen}"
        torch.testing.assert_close(loss, ref_loss, **TOL)
        g = topo.tp_group
        for name, p in model.named_parameters():
            dim = tp_dim(p)
            grad = grads[name] if dim is None else gather_tensor(grads[name], dim, p.tp_full_size, g)
            torch.testing.assert_close(grad, ref_grads[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")
            if dim is None:  # norm weights used on sequence slices included: summed, then identical
                copies = [torch.empty_like(grads[name]) for _ in range(tp)]
                dist.all_gather(copies, grads[name], group=g)
                assert all(torch.equal(c, grads[name]) for c in copies), f"{name}: differs across TP"
            assert torch.equal(full_tensor(p, g), dict(ref.named_parameters())[name].detach())

        model.eval()  # evaluation runs the plain TP path: any length, full logits
        odd = ids[:, :13]
        torch.testing.assert_close(model(odd, gather_output=True), ref.eval()(odd), **TOL)


@pytest.mark.parametrize("recompute", ["none", "full", "selective"])
def test_sequence_parallel_matches_single_process(recompute):
    run_distributed(2, _check_sequence_parallel, tp=2, overrides={}, recompute=recompute)


def test_sequence_parallel_without_query_compression_tied_embeddings():
    run_distributed(
        2,
        _check_sequence_parallel,
        tp=2,
        overrides=dict(q_lora_rank=None, tie_embeddings=True),
        recompute="none",
    )


def _check_indivisible_length() -> None:
    with grid(tp=2) as topo:
        model = MLATransformer(_config(), topo)
        model.set_sequence_parallel(True)
        try:
            model(torch.zeros(1, 15, dtype=torch.long))
        except ValueError as error:
            assert "sequence length 15 is not divisible by tp=2" in str(error), error
        else:
            raise AssertionError("expected a ValueError")


def test_sequence_parallel_needs_a_length_divisible_by_tp():
    run_distributed(2, _check_indivisible_length)


@pytest.mark.parametrize("mode", ["full", "selective", True, False])
def test_recompute_modes_equal_the_plain_run_exactly(mode):
    config = _config(dropout=0.1)  # dropout: the recomputed masks must be the stored ones
    ids = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(1234)
    model = MLATransformer(config)
    results = []
    for m in ("none", mode):
        model.set_recompute(m)
        torch.manual_seed(99)
        results.append(_loss_and_grads(model, ids[:, :-1], ids[:, 1:]))
    (loss, grads), (loss_m, grads_m) = results
    assert torch.equal(loss, loss_m)
    assert all(torch.equal(grads[n], grads_m[n]) for n in grads)


def test_unknown_recompute_mode_names_the_key():
    with pytest.raises(ValueError, match="distributed.recompute='some'"):
        MLATransformer(_config()).set_recompute("some")
