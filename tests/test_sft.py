"""Loss masking: the loss is the mean over the counted targets of the whole global batch.

- A masked instruction batch's loss equals a hand computation (log-softmax of the logits) over the
  completion tokens only (rtol 1e-6: the same fp32 numbers summed in another order).
- The SFT loss curve (a few AdamW steps) is the same for dp=1 and dp=2 and for micro-batches of 1 and 4
  rows, on a batch whose rows count 2 to 11 targets: a mean of per-micro-batch means would differ by
  far more than the 1e-5 allowed (fp32 gradient all-reduce and sums in another order).
"""

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from dist_harness import grid, run_distributed
from tiny_models import TINY_MLA

from models import MLATransformer
from train.data.batch import TokenBatch
from train.data.packing import label_windows
from train.runner import ModelRunner

EOT = 0
CONFIG = TINY_MLA


def _instruction_batch(step: int, rows: int = 4, seq_len: int = 12) -> TokenBatch:
    """Row r: a prompt (not trained) then a completion and EOT (trained): 2 + 3 r counted targets, so
    the rows count 2, 5, 8 and 11."""
    rng = np.random.default_rng([7, step])
    tokens = rng.integers(1, CONFIG.vocab_size, size=(rows, seq_len + 1))
    tokens[:, -1] = EOT
    mask = np.zeros_like(tokens, dtype=np.uint8)
    for r in range(rows):
        mask[r, seq_len - 3 * r - 1 :] = 1
    return label_windows(tokens, mask, EOT, document_masking=False)


def test_masked_loss_is_hand_computed_over_completion_tokens():
    batch = _instruction_batch(0)
    torch.manual_seed(3)
    model = MLATransformer(CONFIG)
    loss = model.loss(batch.inputs, batch.targets)
    logp = F.log_softmax(model(batch.inputs).double(), dim=-1)
    terms = [
        -logp[r, t, batch.targets[r, t]]
        for r in range(batch.rows)
        for t in range(batch.inputs.shape[1])
        if batch.targets[r, t] != -100
    ]
    assert len(terms) == 2 + 5 + 8 + 11  # the completion tokens of the rows, nothing else
    torch.testing.assert_close(loss.double(), torch.stack(terms).mean(), rtol=1e-6, atol=0)


MOE_CONFIG = dataclasses.replace(  # routed experts with DeepSeek's sequence-level balance loss
    CONFIG, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, aux_loss_alpha=0.1
)


def _curve(dp: int, micro_batch_size: int, steps: int = 3, ep: int = 1, config=CONFIG) -> list[float]:
    with grid(dp=dp, ep=ep) as topo:
        torch.manual_seed(3)
        model = MLATransformer(config, topo)
        rows = 4 // dp
        runner = ModelRunner(
            model,
            topo,
            micro_batch_size=micro_batch_size,
            num_microbatches=rows // micro_batch_size,
            seq_len=12,
            precision="fp32",
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for step in range(steps):
            batch = _instruction_batch(step).select(topo.dp_rank * rows, (topo.dp_rank + 1) * rows)
            losses.append(runner.reduce_loss(runner.train_step(batch)).item())
            optimizer.step()
            optimizer.zero_grad()
        return losses


def test_sft_loss_curve_independent_of_layout():
    reference = run_distributed(1, _curve, dp=1, micro_batch_size=4)[0]
    for dp, mbs in [(1, 1), (2, 1), (2, 2)]:
        curve = run_distributed(dp, _curve, dp=dp, micro_batch_size=mbs)[0]
        np.testing.assert_allclose(curve, reference, rtol=1e-5, err_msg=f"dp={dp} micro_batch_size={mbs}")
    # a mean of per-micro-batch means is far off on this batch: the check can fail
    batch = _instruction_batch(0)
    torch.manual_seed(3)
    model = MLATransformer(CONFIG)
    means = torch.stack([model.loss(mb.inputs, mb.targets) for mb in batch.split(4)]).mean()
    assert abs(means.item() - reference[0]) > 1e-3


def test_moe_balance_loss_on_masked_rows_is_independent_of_layout():
    """The balance loss is a mean over rows: with rows counting 2 to 11 targets, weighing each
    micro-batch's balance loss by its counted targets (as its cross-entropy is) changed the curve with
    the split (bug). fp32, 1e-5: sums in another order. dp=2 x ep=2: experts split over the two ranks."""
    reference = run_distributed(1, _curve, dp=1, micro_batch_size=4, config=MOE_CONFIG)[0]
    for dp, mbs, ep in [(1, 1, 1), (2, 1, 2)]:
        curve = run_distributed(dp, _curve, dp=dp, micro_batch_size=mbs, ep=ep, config=MOE_CONFIG)[0]
        np.testing.assert_allclose(curve, reference, rtol=1e-5, err_msg=f"dp={dp} mbs={mbs} ep={ep}")


def _all_masked_micro_batch() -> tuple[float, float, bool]:
    batch = _instruction_batch(0)
    batch.targets[:2] = -100  # the first micro-batch (2 rows) has nothing to count
    with grid(dp=1) as topo:
        torch.manual_seed(3)
        model = MLATransformer(CONFIG, topo)
        runner = ModelRunner(
            model, topo, micro_batch_size=2, num_microbatches=2, seq_len=12, precision="fp32"
        )
        loss = runner.train_step(batch).item()
        finite = all(torch.isfinite(p.grad).all() for p in model.parameters())
        expected = model.loss(batch.inputs[2:], batch.targets[2:]).item()
    return loss, expected, finite


def test_micro_batch_without_counted_targets_adds_nothing():
    loss, expected, finite = run_distributed(1, _all_masked_micro_batch)[0]
    assert finite
    np.testing.assert_allclose(loss, expected, rtol=1e-6)  # fp32, the same sum in another order
