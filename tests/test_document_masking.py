"""Packed documents with document masking equal the same documents run separately.

A packed window holds several documents (each ending with the end-of-text token). With document ids,
attention is block-diagonal causal and RoPE positions restart per document, so each document's
per-token losses must equal those of the document alone in its own row (positions from 0, nothing else
to attend to). Tolerance: rtol 1e-5 on losses and gradients (fp32; the packed row's softmax runs over
masked-out keys as exact zeros, but the matmuls reduce in another order and shape than the short rows).
The same check runs at tp=2 with sequence parallelism and at pp=2, through `ModelRunner`, against the
one-process separate-document loss.
"""

import numpy as np
import pytest
import torch
import torch.distributed as dist
from dist_harness import grid, run_distributed
from tiny_models import TINY_MLA

from models import MLATransformer
from models.mla import document_attention
from models.transformer import split_layers
from train.data.packing import label_windows
from train.runner import ModelRunner

EOT = 0
TOL = dict(rtol=1e-5, atol=1e-6)
CONFIG = TINY_MLA


def _packed(rows: int = 2, seq_len: int = 12, seed: int = 3):
    """Windows of a stream of documents of random lengths (2..9 tokens + EOT), labelled with document ids."""
    rng = np.random.default_rng(seed)
    stream = []
    while len(stream) < rows * (seq_len + 1) + 1:
        stream += [*rng.integers(1, CONFIG.vocab_size, size=int(rng.integers(2, 10))), EOT]
    windows = np.array([stream[r * seq_len : r * seq_len + seq_len + 1] for r in range(rows)])
    return label_windows(windows, None, EOT, document_masking=True)


def _separate_loss(model: MLATransformer, batch) -> tuple[torch.Tensor, int]:
    """Sum of per-token losses with every document of every row run alone, and the counted targets."""
    total, count = torch.zeros(()), 0
    for r in range(batch.rows):
        ids = batch.document_ids[r]
        for d in ids.unique():
            where = ids == d
            x, t = batch.inputs[r][where][None], batch.targets[r][where][None]
            total = total + model.loss(x, t, reduction="sum")
            count += int((t != -100).sum())
    return total, count


def test_document_attention_positions_and_mask():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2]])
    positions, mask = document_attention(ids)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0]]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask[0, 0], expected)


def test_label_windows_ignores_targets_after_end_of_text():
    batch = label_windows(np.array([[5, 6, EOT, 7, 8]]), None, EOT, document_masking=True)
    assert batch.document_ids.tolist() == [[0, 0, 0, 1]]
    assert batch.targets.tolist() == [[6, EOT, -100, 8]]


def test_packed_window_equals_separate_documents():
    batch = _packed()
    assert int(batch.document_ids.max()) >= 2, "the windows must hold several documents"
    torch.manual_seed(5)
    model = MLATransformer(CONFIG)
    packed = model.loss(batch.inputs, batch.targets, reduction="sum", document_ids=batch.document_ids)
    packed.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    separate, _ = _separate_loss(model, batch)
    separate.backward()
    torch.testing.assert_close(packed, separate, **TOL)
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    # without document masking the same window gives another loss: the check can fail
    unmasked = model.loss(batch.inputs, batch.targets, reduction="sum")
    assert not torch.allclose(unmasked, separate, rtol=1e-3)


def _check_layout(tp: int, pp: int, sequence_parallel: bool) -> None:
    batch = _packed(rows=4)
    torch.manual_seed(5)
    reference = MLATransformer(CONFIG)
    ref_sum, ref_count = _separate_loss(reference, batch)
    with grid(tp=tp, pp=pp) as topo:
        specs = split_layers(CONFIG.num_layers, pp)
        torch.manual_seed(5)
        model = MLATransformer(CONFIG, topo, specs[topo.pp_rank])
        model.set_sequence_parallel(sequence_parallel)
        runner = ModelRunner(
            {topo.pp_rank: model}, topo, micro_batch_size=2, num_microbatches=2, seq_len=12, precision="fp32"
        )
        loss = runner.reduce_loss(runner.train_step(batch))
        torch.testing.assert_close(loss.item(), (ref_sum / ref_count).item(), rtol=1e-5, atol=0)
        val = runner.evaluate(batch)
        torch.testing.assert_close(val, (ref_sum / ref_count).item(), rtol=1e-5, atol=0)
        dist.barrier()


@pytest.mark.parametrize("tp,pp,sp", [(2, 1, True), (1, 2, False)])
def test_packed_window_under_tp_and_pp(tp, pp, sp):
    run_distributed(tp * pp, _check_layout, tp=tp, pp=pp, sequence_parallel=sp)
