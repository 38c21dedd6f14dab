"""The MLA transformer at tp 2 and 4 against the same model in one process (tp 1).

Tolerance: rtol=1e-5, atol=1e-6 on logits, loss and gradients (fp32; TP changes the order of the sums in
the row-parallel projections, the embedding and the cross-entropy, and those differences propagate through
a few layers). Weights and replicated gradients are compared exactly: no reduction order is involved.
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


def _check_model(tp: int, overrides: dict) -> None:
    config = _config(**overrides)
    torch.manual_seed(7)
    ids = torch.randint(0, config.vocab_size, (2, 17))
    inputs, targets = ids[:, :-1], ids[:, 1:]

    torch.manual_seed(1234)
    ref = MLATransformer(config)
    ref_logits = ref(inputs)
    ref_loss = ref.loss(inputs, targets)
    ref_loss.backward()

    with grid(tp=tp) as topo:
        torch.manual_seed(1234)
        model = MLATransformer(config, topo)
        g = topo.tp_group
        ref_params = dict(ref.named_parameters())
        names = [n for n, _ in model.named_parameters()]
        assert names == list(ref_params), "parameter names must not depend on tp"
        for name, p in model.named_parameters():
            assert torch.equal(full_tensor(p, g), ref_params[name].detach()), f"{name}: full weight differs"

        logits = model(inputs, gather_output=True)
        torch.testing.assert_close(logits, ref_logits, **TOL)
        loss = model.loss(inputs, targets)
        torch.testing.assert_close(loss, ref_loss, **TOL)
        loss.backward()
        for name, p in model.named_parameters():
            dim = tp_dim(p)
            grad = p.grad if dim is None else gather_tensor(p.grad, dim, p.tp_full_size, g)
            torch.testing.assert_close(grad, ref_params[name].grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")
            if dim is None:
                copies = [torch.empty_like(p.grad) for _ in range(tp)]
                dist.all_gather(copies, p.grad, group=g)
                assert all(torch.equal(c, p.grad) for c in copies), (
                    f"{name}: replicated grad differs across TP"
                )


@pytest.mark.parametrize("tp", [2, 4])
def test_mla_tensor_parallel_matches_single_process(tp):
    run_distributed(tp, _check_model, tp=tp, overrides={})


def test_mla_tensor_parallel_without_query_compression_tied_and_yarn():
    overrides = dict(
        q_lora_rank=None,
        tie_embeddings=True,
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 8,
            "mscale_all_dim": 1.0,
        },
    )
    run_distributed(2, _check_model, tp=2, overrides=overrides)


def _check_heads_not_divisible() -> None:
    with grid(tp=4) as topo:
        try:
            MLATransformer(_config(num_heads=6), topo)
        except ValueError as e:
            assert "model.num_heads=6 is not divisible by tp=4" in str(e)
        else:
            raise AssertionError("expected a ValueError")


def test_heads_not_divisible_by_tp_is_an_error():
    run_distributed(4, _check_heads_not_divisible)


def test_sequence_longer_than_max_seq_len_is_an_error():
    model = MLATransformer(_config())
    with pytest.raises(ValueError, match="sequence length 33 exceeds model.max_seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_same_seed_same_weights_and_padding_never_predicted():
    config = _config(vocab_size=10)
    torch.manual_seed(3)
    a = MLATransformer(config)
    torch.manual_seed(3)
    b = MLATransformer(config)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    logits = a(torch.randint(0, 10, (1, 5)))
    assert logits.shape == (1, 5, 10)
