"""Sweeps (parameter specs, ranking, a 2-trial sweep, early stop under torchrun) and plots.

No numerical tolerance is involved: drawn values are checked against their bounds, and the sweep's
ranking and files against the records it wrote.
"""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import ROOT, TINY

from train import plot
from train.config import load_config
from train.sweep import parse_param, rank_trials

SWEEP_TINY = [*TINY, "train.steps=3"]


def test_param_specs_parse_and_draw_within_their_bounds():
    rng = random.Random(0)
    lr = parse_param("optim.lr=loguniform:1e-4:1e-2")
    draws = [float(lr.sample(rng)) for _ in range(200)]
    assert all(1e-4 <= d <= 1e-2 for d in draws)
    assert min(draws) < 1e-3 < max(draws), "log-uniform: a decade either side of the geometric middle"
    warmup = parse_param("optim.warmup_steps=uniform:0:5")
    assert {warmup.sample(rng) for _ in range(100)} <= {str(i) for i in range(6)}, "integer keys are rounded"
    wd = parse_param("optim.weight_decay=uniform:0.0:0.2")
    assert all(0.0 <= float(wd.sample(rng)) <= 0.2 for _ in range(50))
    schedule = parse_param("optim.schedule=choice:cosine,wsd")
    assert {schedule.sample(rng) for _ in range(50)} == {"cosine", "wsd"}


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("optim.lr", "expected KEY=SPEC"),
        ("optim.lr=normal:0:1", "unknown kind 'normal'"),
        ("optim.lr=uniform:1", "uniform needs two numbers lo:hi"),
        ("optim.lr=loguniform:0:1", "expected 0 < lo <= hi"),
        ("optim.lr=uniform:2:1", "expected lo <= hi"),
    ],
)
def test_bad_param_specs_are_one_line_errors(text, fragment):
    with pytest.raises(ValueError) as err:
        parse_param(text)
    assert f"--param {text!r}" in str(err.value) and fragment in str(err.value)


def test_ranking_puts_finished_trials_first_by_validation_loss():
    records = [
        {"trial": 0, "status": "failed"},
        {"trial": 1, "status": "ok", "val_loss": 5.0},
        {"trial": 2, "status": "diverged", "val_loss": 1.0},
        {"trial": 3, "status": "ok", "val_loss": 4.0},
    ]
    assert [r["trial"] for r in rank_trials(records)] == [3, 1, 2, 0]


def _sweep(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "train.sweep", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_two_trial_sweep_ranks_trials_and_writes_the_best_config(tmp_path):
    out = tmp_path / "sweep"
    params = ["--param", "optim.lr=loguniform:1e-4:1e-2", "--param", "optim.warmup_steps=choice:0,1"]
    result = _sweep(["--trials", "2", "--out", str(out), *params, *SWEEP_TINY, f"data.cache_dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["trial"] for r in records] == [0, 1] and all(r["status"] == "ok" for r in records)
    assert len({r["params"]["optim.lr"] for r in records}) == 2
    for r in records:
        metrics = (out / f"trial-{r['trial']:03d}" / "metrics.jsonl").read_text().splitlines()
        val = [json.loads(m) for m in metrics if '"split"' in m]
        assert val[-1]["loss"] == r["val_loss"] and math.isfinite(r["val_loss"])
    best = min(records, key=lambda r: r["val_loss"])
    table = [line.split() for line in result.stdout.splitlines() if line[:1].isdigit()]
    assert [int(row[1]) for row in table] == [
        r["trial"] for r in sorted(records, key=lambda r: r["val_loss"])
    ]
    config = load_config(out / "best.yaml")
    assert config.optim.lr == best["params"]["optim.lr"]
    assert config.optim.warmup_steps == best["params"]["optim.warmup_steps"]
    assert config.train.out_dir == str(out / "best") and config.train.steps == 3


def test_diverging_trial_stops_early_under_torchrun(tmp_path):
    out = tmp_path / "sweep"
    args = ["--trials", "1", "--nproc", "2", "--max-loss", "1.0", "--out", str(out)]
    result = _sweep([*args, "--param", "optim.lr=choice:1e-3", *SWEEP_TINY, f"data.cache_dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    (record,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert record["status"] == "diverged" and "above train.max_loss=1.0" in record["stop_reason"]
    steps = [json.loads(m)["step"] for m in (out / "trial-000" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1], "the initial evaluation and the first logged step, then nothing"
    assert "no trial finished" in result.stdout and not (out / "best.yaml").exists()


def _write_run(folder: Path, losses: list[float], curriculum: bool = False) -> Path:
    folder.mkdir(parents=True)
    lines = [{"step": 0, "split": "val", "loss": losses[0] + 0.1, "perplexity": 1.0}]
    for step, loss in enumerate(losses, 1):
        record = {"step": step, "loss": loss, "lr": 1e-3 / step, "grad_norm": 1.0, "tokens_per_s": 1e4 + step}
        lines.append({**record, **({"seq_len": 8 * step} if curriculum else {})})
    lines.append({"step": len(losses), "split": "val", "loss": losses[-1] + 0.1, "perplexity": 1.0})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def test_plot_writes_overlaid_curves_into_the_first_run(tmp_path):
    a = _write_run(tmp_path / "a", [6.0, 5.0, 4.5])
    b = _write_run(tmp_path / "b", [6.1, 5.5, 5.0, 4.8])
    written = plot.main([str(a), str(b)])
    assert sorted(p.name for p in written) == ["loss.png", "lr.png", "throughput.png"]
    for path in written:
        assert path.parent == a and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep = tmp_path / "sweep"
    _write_run(sweep / "trial-000", [6.0, 5.0], curriculum=True)
    _write_run(sweep / "trial-001", [6.0, 5.5])
    written = plot.main([str(sweep), "--out", str(tmp_path / "plots")])
    assert sorted(p.name for p in written) == ["loss.png", "lr.png", "seq_len.png", "throughput.png"]
    assert all(p.parent == tmp_path / "plots" for p in written)


def test_plot_without_matplotlib_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    run = _write_run(tmp_path / "a", [6.0, 5.0])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(run)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {plot.MISSING_MATPLOTLIB}"


def test_plot_of_a_folder_without_metrics_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path)])
    assert "no metrics.jsonl here or in its sub-folders" in capsys.readouterr().err
