"""Schedules of a run as pure functions of the step: the learning rate and the sequence-length curriculum.

Learning rate (step k = 0 .. T-1 of T = `train.steps`, peak `lr`, floor `min_lr`, W = `warmup_steps`):

    warmup     k < W:   lr * (k + 1) / W                       (every schedule; W = 0: none)
    constant            lr                                      (min_lr unused)
    linear              min_lr + (lr - min_lr) * (1 - p)        p = (k - W) / (T - W)
    cosine              min_lr + (lr - min_lr) * (1 + cos(pi p)) / 2
    wsd                 lr until T - D, then min_lr + (lr - min_lr) * (1 - (k - (T - D)) / D)

WSD (warmup-stable-decay, as in MiniCPM and Hägele et al. 2024) holds the peak and decays linearly over the
last D = round(decay_fraction * T) steps (at most T - W). Each decaying schedule reaches min_lr at k = T,
one step after the last one trained, and never goes below it.

Curriculum (sequence-length warm-up, Li et al. 2022): over the first N = `curriculum_steps` steps the
length grows linearly from L0 = `curriculum_start_seq_len` to L = `data.seq_len`, as

    target_k = L0 + (L - L0) * k / N,    L_k = L for k >= N.

With constant tokens (the default) a step at length L_k trains on B * L / L_k sequences, where B is
`train.global_batch_size`, so every step sees B * L tokens. For the global batch to be the same whatever
the layout, its B_k sequences must split evenly over any dp x micro-batch split of B, i.e. B_k must be a
multiple of B: so L / L_k must be an integer, and L_k is the largest divisor of L in [L0, target_k] (L0
itself must divide L; for a power-of-two L the lengths double: 32, 64, 128). Every dp rank then takes
B_k / dp sequences in the same number of micro-batches as without the curriculum, each L / L_k times
larger: the tokens per micro-batch, and the pipeline schedule, stay the same. With constant sequences
instead, L_k = floor(target_k) (any L0 < L) and B_k = B: early steps see fewer tokens.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from train.config import Config

SCHEDULES = ("constant", "linear", "cosine", "wsd")


def learning_rate(
    step: int,
    *,
    schedule: str,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    total_steps: int,
    decay_fraction: float = 0.2,
) -> float:
    """The learning rate of (0-based) `step`, by the formulas in the module docstring."""
    if schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "wsd":
        decay_steps = min(round(decay_fraction * total_steps), max(0, total_steps - warmup_steps))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return lr
        progress = min(1.0, (step - decay_start) / max(1, decay_steps))
        return lr - (lr - min_lr) * progress
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_lr + (lr - min_lr) * shape


def divisors(n: int) -> list[int]:
    """The positive divisors of n, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def check_curriculum(
    start_seq_len: int | None, steps: int, seq_len: int, constant_tokens: bool = True
) -> None:
    """Raise a one-line ValueError naming the key if the curriculum settings cannot work."""
    if start_seq_len is None:
        return
    if not 1 <= start_seq_len < seq_len:
        raise ValueError(
            f"train.curriculum_start_seq_len={start_seq_len}: expected a length in "
            f"[1, data.seq_len={seq_len})"
        )
    if constant_tokens and seq_len % start_seq_len:
        choices = ", ".join(str(d) for d in divisors(seq_len)[:-1])
        raise ValueError(
            f"train.curriculum_start_seq_len={start_seq_len}: with constant tokens per step it must divide "
            f"data.seq_len={seq_len} (one of {choices}), or set train.curriculum_constant_tokens=false"
        )
    if steps < 1:
        raise ValueError(
            f"train.curriculum_steps={steps}: expected a value >= 1 when "
            "train.curriculum_start_seq_len is set"
        )


def curriculum_at(
    step: int,
    *,
    start_seq_len: int | None,
    steps: int,
    seq_len: int,
    global_batch_size: int,
    constant_tokens: bool = True,
) -> tuple[int, int]:
    """(sequence length, sequences) of the global batch at `step`; (seq_len, global_batch_size) when the
    curriculum is off (`start_seq_len=None`) or over."""
    if start_seq_len is None or step >= steps:
        return seq_len, global_batch_size
    target = start_seq_len + (seq_len - start_seq_len) * step // steps
    if not constant_tokens:
        return target, global_batch_size
    length = max(d for d in divisors(seq_len) if start_seq_len <= d <= target)
    return length, global_batch_size * (seq_len // length)


def lr_at(step: int, config: Config) -> float:
    """`learning_rate` of step `step` with the config's `optim` section and `train.steps`."""
    opt = config.optim
    return learning_rate(
        step,
        schedule=opt.schedule,
        lr=opt.lr,
        min_lr=opt.min_lr,
        warmup_steps=opt.warmup_steps,
        total_steps=config.train.steps,
        decay_fraction=opt.decay_fraction,
    )


def batch_shape_at(step: int, config: Config) -> tuple[int, int]:
    """(sequence length, sequences) of the global batch at `step`, under `train.curriculum_*`."""
    tc = config.train
    return curriculum_at(
        step,
        start_seq_len=tc.curriculum_start_seq_len,
        steps=tc.curriculum_steps,
        seq_len=config.data.seq_len,
        global_batch_size=tc.global_batch_size,
        constant_tokens=tc.curriculum_constant_tokens,
    )
