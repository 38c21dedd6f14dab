"""Column/row/vocab-parallel layers against nn.Linear, nn.Embedding and F.cross_entropy.

Every test builds the full reference layer and the TP layer from the same full weights on each rank, runs
both on the same input and compares outputs and every gradient (TP gradients gathered to full size).
Tolerance: rtol=1e-6, atol=1e-6 — fp32 sums over ranks change the reduction order, nothing else.
"""

import pytest
import torch
import torch.nn.functional as F
from dist_harness import grid, run_distributed

from parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    gather_tensor,
    shard_tensor,
    vocab_parallel_cross_entropy,
)
from parallel.collectives import gather_from_sequence_parallel

TOL = dict(rtol=1e-6, atol=1e-6)


def _load_full(layer, name, full, rank, world):
    param = getattr(layer, name)
    dim = getattr(param, "tp_dim", None)
    with torch.no_grad():
        param.copy_(full if dim is None else shard_tensor(full, dim, rank, world))


def _grad_full(param, group):
    dim = getattr(param, "tp_dim", None)
    return param.grad if dim is None else gather_tensor(param.grad, dim, param.tp_full_size, group)


def _check_column(tp: int, gather_output: bool, sequence_parallel: bool) -> None:
    with grid(tp=tp) as topo:
        g, r = topo.tp_group, topo.tp_rank
        torch.manual_seed(0)
        ref = torch.nn.Linear(12, 8 * tp, bias=True)
        x = torch.randn(2, 4 * tp, 12, requires_grad=True)
        layer = ColumnParallelLinear(
            12, 8 * tp, bias=True, group=g, gather_output=gather_output, sequence_parallel=sequence_parallel
        )
        _load_full(layer, "weight", ref.weight.detach(), r, tp)
        _load_full(layer, "bias", ref.bias.detach(), r, tp)
        y_ref = ref(x)
        x_local = x.detach().chunk(tp, dim=1)[r] if sequence_parallel else x.detach()
        x_local.requires_grad_()
        y = layer(x_local)
        y_full = y if gather_output else gather_tensor(y.detach(), -1, 8 * tp, g)
        torch.testing.assert_close(y_full, y_ref, **TOL)
        upstream = torch.randn_like(y_ref)
        y_ref.backward(upstream)
        y.backward(upstream if gather_output else upstream.chunk(tp, dim=-1)[r])
        torch.testing.assert_close(_grad_full(layer.weight, g), ref.weight.grad, **TOL)
        torch.testing.assert_close(_grad_full(layer.bias, g), ref.bias.grad, **TOL)
        expected_x_grad = x.grad.chunk(tp, dim=1)[r] if sequence_parallel else x.grad
        torch.testing.assert_close(x_local.grad, expected_x_grad, **TOL)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("gather_output", [False, True])
def test_column_parallel_linear_matches_linear(tp, gather_output):
    run_distributed(tp, _check_column, tp=tp, gather_output=gather_output, sequence_parallel=False)


def test_column_parallel_linear_sequence_parallel():
    run_distributed(2, _check_column, tp=2, gather_output=False, sequence_parallel=True)


def _check_row(tp: int, input_is_parallel: bool, sequence_parallel: bool, bias: bool) -> None:
    with grid(tp=tp) as topo:
        g, r = topo.tp_group, topo.tp_rank
        torch.manual_seed(1)
        ref = torch.nn.Linear(4 * tp, 6, bias=bias)
        x = torch.randn(2, 2 * tp, 4 * tp, requires_grad=True)
        layer = RowParallelLinear(
            4 * tp,
            6,
            bias=bias,
            group=g,
            input_is_parallel=input_is_parallel,
            sequence_parallel=sequence_parallel,
        )
        _load_full(layer, "weight", ref.weight.detach(), r, tp)
        if bias:
            _load_full(layer, "bias", ref.bias.detach(), r, tp)
        x_local = (x.detach().chunk(tp, dim=-1)[r] if input_is_parallel else x.detach()).requires_grad_()
        y = layer(x_local)
        y_ref = ref(x)
        expected = y_ref.chunk(tp, dim=1)[r] if sequence_parallel else y_ref
        torch.testing.assert_close(y, expected, **TOL)
        upstream = torch.randn_like(y_ref)
        y_ref.backward(upstream)
        y.backward(upstream.chunk(tp, dim=1)[r] if sequence_parallel else upstream)
        torch.testing.assert_close(_grad_full(layer.weight, g), ref.weight.grad, **TOL)
        if bias:
            torch.testing.assert_close(layer.bias.grad, ref.bias.grad, **TOL)
        expected_x_grad = x.grad.chunk(tp, dim=-1)[r] if input_is_parallel else x.grad
        torch.testing.assert_close(x_local.grad, expected_x_grad, **TOL)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("input_is_parallel", [True, False])
def test_row_parallel_linear_matches_linear(tp, input_is_parallel):
    run_distributed(
        tp, _check_row, tp=tp, input_is_parallel=input_is_parallel, sequence_parallel=False, bias=True
    )


def test_row_parallel_linear_sequence_parallel():
    run_distributed(2, _check_row, tp=2, input_is_parallel=True, sequence_parallel=True, bias=False)


def _check_embedding_and_cross_entropy(tp: int, vocab: int) -> None:
    with grid(tp=tp) as topo:
        g, r = topo.tp_group, topo.tp_rank
        torch.manual_seed(2)
        ref = torch.nn.Embedding(vocab, 5)
        ids = torch.randint(0, vocab, (3, 7))
        ids[0, :2] = torch.tensor([0, vocab - 1])
        layer = VocabParallelEmbedding(vocab, 5, group=g)
        _load_full(layer, "weight", ref.weight.detach(), r, tp)
        out = layer(ids)
        out_ref = ref(ids)
        torch.testing.assert_close(out, out_ref, **TOL)
        upstream = torch.randn_like(out_ref)
        out.backward(upstream)
        out_ref.backward(upstream)
        torch.testing.assert_close(_grad_full(layer.weight, g), ref.weight.grad, **TOL)

        # Cross-entropy over vocab-sharded logits (padding columns carry -inf, as the model's head does).
        logits = torch.randn(3, 7, vocab, requires_grad=True)
        targets = torch.randint(0, vocab, (3, 7))
        targets[1, 3] = -100
        targets[2, :] = -100
        local = shard_tensor(logits.detach(), -1, r, tp)
        valid = max(0, min(local.shape[-1], vocab - r * local.shape[-1]))
        local[..., valid:] = float("-inf")
        local.requires_grad_()
        for reduction in ("mean", "sum", "none"):
            loss = vocab_parallel_cross_entropy(local, targets, g, reduction=reduction)
            loss_ref = F.cross_entropy(logits.transpose(1, 2), targets, reduction=reduction)
            torch.testing.assert_close(loss, loss_ref, **TOL)
        loss = vocab_parallel_cross_entropy(local, targets, g)
        loss_ref = F.cross_entropy(logits.transpose(1, 2), targets)
        loss.backward()
        loss_ref.backward()
        grad_full = gather_tensor(local.grad, -1, vocab, g)
        torch.testing.assert_close(grad_full, logits.grad, **TOL)
        assert torch.all(local.grad[..., valid:] == 0), "padding columns must get no gradient"


@pytest.mark.parametrize("tp,vocab", [(1, 11), (2, 11), (4, 10), (4, 13)])
def test_vocab_parallel_embedding_and_cross_entropy(tp, vocab):
    run_distributed(tp, _check_embedding_and_cross_entropy, tp, vocab)


def test_embedding_rejects_out_of_vocabulary_ids():
    layer = VocabParallelEmbedding(10, 4)
    with pytest.raises(ValueError, match="token id 10 is outside the vocabulary"):
        layer(torch.tensor([[1, 10]]))
    with pytest.raises(ValueError, match="token id -1"):
        layer(torch.tensor([[-1, 3]]))


def test_shard_and_gather_round_trip_uneven():
    full = torch.arange(10.0).view(10, 1)
    shards = [shard_tensor(full, 0, r, 4) for r in range(4)]
    assert [s.shape[0] for s in shards] == [3, 3, 3, 3]
    assert torch.equal(torch.cat(shards)[:10], full)
    assert torch.equal(shards[3][1:], torch.zeros(2, 1))


def test_row_parallel_rejects_indivisible_input(monkeypatch):
    import parallel.tensor.linear as linear_module

    class FakeGroup:
        pass

    monkeypatch.setattr(linear_module, "group_size", lambda group: 4)
    monkeypatch.setattr(linear_module, "group_rank", lambda group: 0)
    with pytest.raises(ValueError, match="in_features=6 is not divisible by tp=4"):
        RowParallelLinear(6, 2, group=FakeGroup())


def _check_sequence_parallel_round_trip(tp: int) -> None:
    with grid(tp=tp) as topo:
        x = torch.arange(2 * 4 * tp * 3, dtype=torch.float32).view(2, 4 * tp, 3)
        local = x.chunk(tp, dim=1)[topo.tp_rank]
        assert torch.equal(gather_from_sequence_parallel(local, 1, topo.tp_group), x)


def test_sequence_parallel_gather():
    run_distributed(2, _check_sequence_parallel_round_trip, 2)
