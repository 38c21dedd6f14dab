"""Learning-rate schedules at their corners, and the sequence-length curriculum.

Tolerances: learning rates to 1e-12 relative (closed forms in float64). Curriculum batches are compared
exactly (integer token ids). The pipeline run with a curriculum matches one process to 1e-5 relative, as
every layout does in test_cli (only the order of floating-point sums differs).
"""

import json
import math

import numpy as np
import pytest
from test_cli import TINY, run_cli

from train.config import ConfigError, load_config
from train.data import BatchSampler
from train.schedules import batch_shape_at, curriculum_at, divisors, learning_rate, lr_at

LR, MIN_LR, WARMUP, TOTAL = 1.0e-3, 1.0e-4, 10, 110


def lr(step: int, schedule: str, **kw) -> float:
    args = dict(schedule=schedule, lr=LR, min_lr=MIN_LR, warmup_steps=WARMUP, total_steps=TOTAL, **kw)
    return learning_rate(step, **args)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine", "wsd"])
def test_warmup_is_linear_to_the_peak_for_every_schedule(schedule):
    assert lr(0, schedule) == pytest.approx(LR / WARMUP, rel=1e-12)
    assert lr(4, schedule) == pytest.approx(LR * 5 / WARMUP, rel=1e-12)
    assert lr(WARMUP - 1, schedule) == pytest.approx(LR, rel=1e-12)
    assert lr(WARMUP, schedule) == pytest.approx(LR, rel=1e-12), "the first step after warmup is at the peak"


def test_without_warmup_step_zero_is_at_the_peak():
    assert learning_rate(0, schedule="cosine", lr=LR, min_lr=0.0, warmup_steps=0, total_steps=5) == LR


@pytest.mark.parametrize("schedule", ["linear", "cosine", "wsd"])
def test_decaying_schedules_end_at_min_lr_and_never_leave_the_band(schedule):
    assert lr(TOTAL, schedule) == pytest.approx(MIN_LR, rel=1e-12)
    assert lr(TOTAL + 50, schedule) == pytest.approx(MIN_LR, rel=1e-12)
    values = [lr(k, schedule) for k in range(WARMUP, TOTAL + 1)]
    assert all(MIN_LR <= v <= LR for v in values)
    assert all(a >= b for a, b in zip(values, values[1:], strict=False)), "monotone after warmup"


def test_constant_stays_at_the_peak_and_ignores_min_lr():
    assert lr(TOTAL - 1, "constant") == lr(TOTAL, "constant") == LR


def test_linear_and_cosine_midpoints():
    middle = WARMUP + (TOTAL - WARMUP) // 2
    assert lr(middle, "linear") == pytest.approx((LR + MIN_LR) / 2, rel=1e-12)
    assert lr(middle, "cosine") == pytest.approx((LR + MIN_LR) / 2, rel=1e-12)
    quarter = WARMUP + (TOTAL - WARMUP) // 4
    assert lr(quarter, "cosine") == pytest.approx(MIN_LR + (LR - MIN_LR) * (1 + math.cos(math.pi / 4)) / 2)


def test_wsd_is_stable_until_the_last_decay_fraction_then_linear():
    decay = round(0.2 * TOTAL)  # 22 steps: decay from step 88
    start = TOTAL - decay
    assert lr(start - 1, "wsd") == lr(start, "wsd") == LR
    assert lr(start + 1, "wsd") == pytest.approx(LR - (LR - MIN_LR) / decay, rel=1e-12)
    assert lr(start + decay // 2, "wsd") == pytest.approx((LR + MIN_LR) / 2, rel=1e-12)
    assert lr(TOTAL - 1, "wsd", decay_fraction=0.0) == LR, "decay_fraction=0: no decay"
    # a decay window longer than what follows warmup starts right after warmup
    assert lr(WARMUP, "wsd", decay_fraction=1.0) == LR
    assert lr(WARMUP + 50, "wsd", decay_fraction=1.0) == pytest.approx(lr(WARMUP + 50, "linear"), rel=1e-12)


def test_trainer_lr_at_reads_the_config():
    cfg = load_config(
        None, ["optim.schedule=wsd", "optim.decay_fraction=0.5", "optim.warmup_steps=2", "train.steps=10"]
    )
    got = [lr_at(k, cfg) for k in range(10)]
    o = cfg.optim
    want = [
        learning_rate(
            k, schedule="wsd", lr=o.lr, min_lr=o.min_lr, warmup_steps=2, total_steps=10, decay_fraction=0.5
        )
        for k in range(10)
    ]
    assert got == want and got[4] == o.lr and got[5] == o.lr and got[6] < o.lr


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("optim.schedule=step", "optim.schedule='step': expected one of cosine, linear, constant, wsd"),
        ("optim.decay_fraction=1.5", "optim.decay_fraction=1.5: expected a value in [0, 1]"),
        ("train.curriculum_start_seq_len=48", "train.curriculum_start_seq_len=48: with constant tokens"),
        (
            "train.curriculum_start_seq_len=128",
            "train.curriculum_start_seq_len=128: expected a length in [1,",
        ),
    ],
)
def test_bad_schedule_settings_are_one_line_errors(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.curriculum_steps=10", override])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_curriculum_without_steps_is_an_error():
    with pytest.raises(ConfigError, match=r"train.curriculum_steps=0: expected a value >= 1"):
        load_config(None, ["train.curriculum_start_seq_len=32"])


def test_curriculum_keeps_tokens_per_step_constant_with_divisor_lengths():
    B, L = 12, 96
    shapes = [curriculum_at(k, start_seq_len=12, steps=40, seq_len=L, global_batch_size=B) for k in range(45)]
    lengths = [s for s, _ in shapes]
    assert lengths[0] == 12 and lengths[39] < L and lengths[40:] == [L] * 5
    assert all(a <= b for a, b in zip(lengths, lengths[1:], strict=False)), "the length only grows"
    for length, rows in shapes:
        assert length in divisors(L) and rows * length == B * L and rows % B == 0
    assert set(lengths) == {12, 16, 24, 32, 48, 96}, "every divisor of 96 from 12 on is used"


def test_curriculum_with_constant_sequences_grows_linearly():
    shapes = [
        curriculum_at(k, start_seq_len=10, steps=4, seq_len=50, global_batch_size=8, constant_tokens=False)
        for k in range(6)
    ]
    assert shapes == [(10, 8), (20, 8), (30, 8), (40, 8), (50, 8), (50, 8)]
    off = curriculum_at(0, start_seq_len=None, steps=0, seq_len=50, global_batch_size=8)
    assert off == (50, 8)


def test_curriculum_batches_depend_only_on_seed_and_step_whatever_the_dp_split():
    cfg = load_config(
        None,
        [
            "data.seq_len=32",
            "train.global_batch_size=4",
            "train.curriculum_start_seq_len=8",
            "train.curriculum_steps=6",
        ],
    )
    tokens = np.arange(5000, dtype=np.uint16)
    sampler = BatchSampler(tokens, 32, 4, seed=7)
    for step in range(8):
        length, rows = batch_shape_at(step, cfg)
        whole = sampler.global_batch(step, seq_len=length, batch_size=rows)
        assert whole.shape == (rows, length + 1) and rows * length == 4 * 32
        halves = [sampler.local_batch(step, r, 2, seq_len=length, batch_size=rows) for r in range(2)]
        quarters = [sampler.local_batch(step, r, 4, seq_len=length, batch_size=rows) for r in range(4)]
        assert np.array_equal(np.concatenate(halves), whole)
        assert np.array_equal(np.concatenate(quarters), whole)
        assert np.array_equal(whole[:, 1:] - whole[:, :-1], np.ones((rows, length))), "contiguous windows"
    assert np.array_equal(sampler.global_batch(3, seq_len=32, batch_size=4), sampler.global_batch(3))


def _train_records(out) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "split" not in r]


def test_cli_trains_with_a_curriculum_and_a_pipeline_gets_the_same_losses(tmp_path):
    common = [
        *TINY,
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.curriculum_start_seq_len=8",
        "train.curriculum_steps=3",
    ]
    single = run_cli([*common, f"train.out_dir={tmp_path / 'one'}"])
    assert single.returncode == 0, single.stderr[-3000:]
    assert "sequence-length curriculum 8 -> 32 over 3 steps" in single.stdout
    records = _train_records(tmp_path / "one")
    assert [r["seq_len"] for r in records] == [8, 16, 16, 32]
    assert [r["tokens"] for r in records] == [256, 512, 768, 1024], "8 x 32 tokens every step"
    assert all(math.isfinite(r["loss"]) for r in records)

    pipe = ["distributed.pp=2", "distributed.pp_schedule=gpipe", "distributed.num_microbatches=2"]
    piped = run_cli([*common, f"train.out_dir={tmp_path / 'pp'}", *pipe], nproc=2)
    assert piped.returncode == 0, piped.stderr[-3000:]
    for a, b in zip(_train_records(tmp_path / "pp"), records, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["seq_len"] == b["seq_len"]
