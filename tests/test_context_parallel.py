"""Context parallelism (parallel/context/) against the same computation in one process.

The zigzag split and its inverse are checked exactly. The latent attention of every simulated rank is
compared with PyTorch's SDPA over the whole sequence in fp64 (rtol 1e-10: the same sums in another order,
so only rounding of fp64 differs). The MLA transformer at cp = 2 and 4 (gloo), alone and with tp = 2 and
sequence parallelism, causal and with packed documents (positions restarting per document, documents
crossing the zigzag pieces), with full and selective recompute, must give every rank's logits, the loss
(sums and counts combined over cp) and every gradient (summed over cp) of the one-process model:
rtol 1e-5, atol 1e-6 (fp32; the attention's softmax is merged from per-piece log-sum-exps and the
gradients of the latents are summed over ranks, so only the order of fp32 sums differs). bf16 autocast:
the loss within 2e-2 of the one-process bf16 loss (the bf16 rounding ladder).
"""

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_harness import grid, run_distributed
from tiny_models import TINY_MLA

from models import MLAConfig, MLATransformer
from parallel.context import ContextShard, latent_attention, zigzag_merge, zigzag_positions, zigzag_split
from parallel.context.attention import Plan
from parallel.tensor import tp_dim
from parallel.tensor.sharding import gather_tensor

TOL = dict(rtol=1e-5, atol=1e-6)
SEQ = 16
CONFIG = replace(TINY_MLA, max_seq_len=SEQ)
# documents of 5, 7 and 4 tokens, and 2, 12 and 2: they cross the pieces of cp = 2 and cp = 4
DOCUMENTS = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 2 + [1] * 12 + [2] * 2])


def test_zigzag_split_merge_and_balance():
    x = torch.arange(16)
    assert zigzag_split(x, 0, 0, 2).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert zigzag_split(x, 0, 1, 2).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    for cp in (1, 2, 4, 8):
        parts = [zigzag_split(x, 0, r, cp) for r in range(cp)]
        assert torch.equal(zigzag_merge(torch.cat(parts), 0, cp), x)
        assert all(torch.equal(zigzag_positions(16 // cp, r, cp), parts[r]) for r in range(cp))
        # causal work: every rank computes the same number of (query piece, key piece) pairs
        work = [
            sum(len(Plan(ContextShard(None, r, cp, x), 1, 1.0, 1).users(j)) for j in range(2 * cp))
            for r in range(cp)
        ]
        assert work == [2 * cp + 1] * cp
    with pytest.raises(ValueError, match="divisible by 2 x cp = 6"):
        zigzag_split(x, 0, 0, 3)


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("documents", [False, True], ids=["causal", "documents"])
def test_latent_attention_equals_sdpa_over_the_whole_sequence(cp, documents):
    torch.manual_seed(0)
    b, h, s, d_nope, d_rope, d_v, rank, scale = 2, 3, SEQ, 8, 4, 6, 10, 0.3
    kw = dict(dtype=torch.float64, requires_grad=True)
    query, latent = torch.randn(b, h, s, d_nope + d_rope, **kw), torch.randn(b, s, rank, **kw)
    k_rope, weight = torch.randn(b, s, d_rope, **kw), torch.randn(rank, h * (d_nope + d_v), **kw)
    k_nope, value = (latent @ weight).view(b, s, h, -1).transpose(1, 2).split([d_nope, d_v], -1)
    key = torch.cat([k_nope, k_rope.unsqueeze(1).expand(b, h, s, d_rope)], -1)
    index = torch.arange(s)
    mask = (index[None, :] <= index[:, None]) & (DOCUMENTS[:, :, None] == DOCUMENTS[:, None, :])
    mask = mask.unsqueeze(1) if documents else None
    expected = F.scaled_dot_product_attention(query, key, value, mask, is_causal=not documents, scale=scale)
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (query, latent, k_rope, weight), grad_out)

    def gathered(t):
        return torch.cat([zigzag_split(t, 1, r, cp) for r in range(cp)], 1)

    outs = []
    for r in range(cp):
        ids = (zigzag_split(DOCUMENTS, 1, r, cp), gathered(DOCUMENTS)) if documents else (None, None)
        shard = ContextShard(None, r, cp, zigzag_positions(s // cp, r, cp), *ids)
        q = zigzag_split(query, 2, r, cp)
        outs.append(latent_attention(q, gathered(latent), gathered(k_rope), weight, shard, scale, d_nope))
    out = zigzag_merge(torch.cat(outs, 2), 2, cp)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(out, (query, latent, k_rope, weight), grad_out)
    for name, got, want in zip(("query", "latent", "k_rope", "W_kvb"), grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


def _batch():
    torch.manual_seed(7)
    ids = torch.randint(0, CONFIG.vocab_size, (2, SEQ + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[0, :3] = -100  # counted targets differ between ranks: the loss must count globally
    return inputs, targets


def _check_model(cp, tp, documents, sequence_parallel=False, recompute="none", precision="fp32", ring=True):
    inputs, targets = _batch()
    docs = DOCUMENTS if documents else None
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    torch.manual_seed(1234)
    ref = MLATransformer(CONFIG)
    with autocast:
        ref_logits = ref(inputs, document_ids=docs)
        ref_loss = ref.loss(inputs, targets, document_ids=docs)
    ref_loss.backward()
    with grid(cp=cp, tp=tp) as topo:
        torch.manual_seed(1234)
        model = MLATransformer(CONFIG, topo)
        model.set_context_parallel(topo.cp_group, ring=ring)
        model.set_recompute(recompute)
        model.set_sequence_parallel(sequence_parallel)

        def local(t):
            return None if t is None else zigzag_split(t, 1, topo.cp_rank, cp)

        with autocast:
            logits = model(local(inputs), gather_output=True, document_ids=local(docs))
            loss_sum = model.loss(local(inputs), local(targets), reduction="sum", document_ids=local(docs))
        totals = torch.stack([loss_sum.detach().float(), (local(targets) != -100).sum().float()])
        dist.all_reduce(totals, group=topo.cp_group)
        if precision == "bf16":
            torch.testing.assert_close(totals[0] / totals[1], ref_loss.float(), rtol=2e-2, atol=2e-2)
            return
        torch.testing.assert_close(logits, local(ref_logits), **TOL)
        torch.testing.assert_close(totals[0] / totals[1], ref_loss, **TOL)
        (loss_sum / totals[1]).backward()
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            grad = p.grad.clone()
            dist.all_reduce(grad, group=topo.cp_group)
            dim = tp_dim(p)
            if dim is not None:
                grad = gather_tensor(grad, dim, p.tp_full_size, topo.tp_group)
            torch.testing.assert_close(grad, ref_params[name].grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    "cp, documents, recompute, ring",
    [
        (2, False, "none", True),
        (2, True, "full", False),
        (4, False, "selective", True),
        (4, True, "none", False),
    ],
    ids=[
        "cp2-causal-ring",
        "cp2-documents-full-recompute-all-gather",
        "cp4-causal-selective-ring",
        "cp4-documents-all-gather",
    ],
)
def test_context_parallel_model_matches_single_process(cp, documents, recompute, ring):
    run_distributed(cp, _check_model, cp=cp, tp=1, documents=documents, recompute=recompute, ring=ring)


def test_context_parallel_with_tensor_and_sequence_parallel_matches_single_process():
    run_distributed(4, _check_model, cp=2, tp=2, documents=True, sequence_parallel=True)


def test_context_parallel_bf16_loss_within_the_bf16_ladder():
    run_distributed(2, _check_model, cp=2, tp=1, documents=True, precision="bf16")


def _check_generation_unaffected():
    inputs, _ = _batch()
    torch.manual_seed(1234)
    ref = MLATransformer(CONFIG).eval()
    with grid(cp=2) as topo:
        torch.manual_seed(1234)
        model = MLATransformer(CONFIG, topo).eval()
        model.set_context_parallel(None)  # whole sequences on every rank, as generation runs
        torch.testing.assert_close(model(inputs), ref(inputs), rtol=0, atol=0)


def test_generation_runs_whole_sequences_with_context_parallelism_switched_off():
    run_distributed(2, _check_generation_unaffected)


def _saved_per_local_token(precision: str) -> tuple[float, float, float]:
    """(bytes autograd saves per local token in one decoder layer at cp=2, the estimate, the estimate at
    cp=1 per token)."""
    from models.transformer import StageSpec
    from train.activations import context_weight_bytes, layer_activation_bytes
    from train.config import load_config

    with grid(cp=2) as topo:
        mcfg = MLAConfig(**{**CONFIG.to_dict(), "num_layers": 1, "max_seq_len": 64})
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        model = MLATransformer(mcfg, topo, stage=StageSpec(0, 1, is_first=False, is_last=False)).to(dtype)
        kept = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        saved = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in kept:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(4, 32, mcfg.hidden_size, dtype=dtype, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.model(x)
    overrides = [f"train.precision={precision}", "data.seq_len=64"]
    cp2 = load_config(None, [*overrides, "distributed.cp=2"])
    estimate = sum(layer_activation_bytes(mcfg, cp2).values()) + context_weight_bytes(mcfg, cp2) / (4 * 32)
    plain = sum(layer_activation_bytes(mcfg, load_config(None, overrides)).values())
    return sum(saved.values()) / (4 * 32), estimate, plain


def _saved_cases():
    return [_saved_per_local_token(p) for p in ("fp32", "bf16")]


def test_activation_estimate_per_local_token_matches_saved_tensors_at_cp2():
    """What autograd keeps per local token (with the per-layer W_kvb spread over the 4 x 32 local tokens)
    equals train/activations.py's cp figure within 8 B/token: the estimate leaves out the per-position
    RoPE cos/sin slices (4 of 32 x 2 fp32 per row of a micro-batch of 4). It is less than a
    whole-sequence run keeps per token (no per-head keys and values)."""
    for measured, estimate, plain in run_distributed(2, _saved_cases)[0]:
        assert measured == pytest.approx(estimate, abs=8)
        assert estimate < plain


def _check_ring_equals_all_gather(cp, documents):
    from parallel.context.ring import ring_latent_attention

    torch.manual_seed(0)
    b, h, s, d_nope, d_rope, d_v, rank, scale = 2, 3, SEQ, 8, 4, 6, 10, 0.3
    kw = dict(dtype=torch.float64, requires_grad=True)
    query, latent = torch.randn(b, h, s, d_nope + d_rope, **kw), torch.randn(b, s, rank, **kw)
    k_rope, weight = torch.randn(b, s, d_rope, **kw), torch.randn(rank, h * (d_nope + d_v), **kw)
    grad_out = torch.randn(b, h, s // cp, d_v, dtype=torch.float64)
    with grid(cp=cp) as topo:
        r = topo.cp_rank

        def gathered(t):
            return torch.cat([zigzag_split(t, 1, i, cp) for i in range(cp)], 1)

        ids = (zigzag_split(DOCUMENTS, 1, r, cp), gathered(DOCUMENTS)) if documents else (None, None)
        shard = ContextShard(topo.cp_group, r, cp, zigzag_positions(s // cp, r, cp), *ids)
        q = zigzag_split(query, 2, r, cp)
        results = []
        for ring in (False, True):
            if ring:
                local = (zigzag_split(latent, 1, r, cp), zigzag_split(k_rope, 1, r, cp))
                out = ring_latent_attention(q, *local, weight, shard, scale, d_nope)
            else:
                out = latent_attention(q, gathered(latent), gathered(k_rope), weight, shard, scale, d_nope)
            grads = torch.autograd.grad(out, (query, latent, k_rope, weight), grad_out)
            for g in grads:  # each rank holds its queries' share: the full gradients are the sums
                dist.all_reduce(g, group=topo.cp_group)
            results.append((out, *grads))
        for name, got, want in zip(("out", "query", "latent", "k_rope", "W_kvb"), *results, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("cp, documents", [(2, True), (4, False)])
def test_ring_exchange_equals_the_all_gather(cp, documents):
    """The ring alternative (parallel/context/ring.py): same outputs and gradients as the all-gather path
    (fp64, rtol 1e-10: only the order of the log-sum-exp merge differs)."""
    run_distributed(cp, _check_ring_equals_all_gather, cp=cp, documents=documents)
