"""Global gradient-norm clipping under TP counts replicated parameters once.

Tolerance: rtol=1e-6 (fp32 sums of squares in a different order).
"""

import torch
from dist_harness import grid, run_distributed

from models import MLAConfig, MLATransformer
from parallel import gather_tensor
from parallel.grad_clip import clip_grad_norm_
from parallel.tensor import tp_dim

CONFIG = MLAConfig(
    vocab_size=101,
    hidden_size=32,
    num_layers=1,
    num_heads=4,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    intermediate_size=64,
    max_seq_len=16,
)


def _grads_after_backward(topology):
    torch.manual_seed(3)
    model = MLATransformer(CONFIG, topology)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    return model


def _check_clip(tp: int) -> None:
    ref = _grads_after_backward(None)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
    with grid(tp=tp) as topo:
        model = _grads_after_backward(topo)
        norm = clip_grad_norm_(model.parameters(), 0.1, topo.tp_group)
        torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=0)
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            dim = tp_dim(p)
            grad = p.grad if dim is None else gather_tensor(p.grad, dim, p.tp_full_size, topo.tp_group)
            torch.testing.assert_close(grad, ref_params[name].grad, rtol=1e-5, atol=1e-8)


def test_clip_grad_norm_matches_single_process_at_tp2():
    run_distributed(2, _check_clip, 2)


def test_clip_grad_norm_single_process_matches_torch():
    model = _grads_after_backward(None)
    grads = [p.grad.clone() for p in model.parameters()]
    expected = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    norm = clip_grad_norm_(model.parameters(), 1e9)
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True)), (
        "no clip below max"
    )
