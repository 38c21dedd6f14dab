"""Checkpoints through the command line under a real torchrun: SIGTERM, killed workers, kills mid-save.

Every run here is dp=2 with ZeRO-1 and 8-bit AdamW, 6 steps, a checkpoint every 2 steps,
`train.resume=auto`. Interrupted runs must end with the loss curve of the uninterrupted one bit for bit
(loss, gradient norm, learning rate, validation loss) and the same final weights byte for byte: a resume
in the same layout restores every number, 8-bit codes and RNG states included. Faults are injected with
a `train.faults.FaultPlan` that tests/fault_entry.py builds from its `--fault-*` options (rank 1, first
torchrun attempt only).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import SCRIPT, TINY

ROOT = Path(__file__).resolve().parents[1]
FAULT_ENTRY = str(Path(__file__).resolve().parent / "fault_entry.py")
COMMON = [
    *TINY,
    "train.steps=6",
    "train.save_every=2",
    "distributed.dp=2",
    "distributed.zero_stage=1",
    "optim.name=adamw8bit",
    "train.resume=auto",
]


def torchrun(args: list[str], faults: list[str] = (), max_restarts: int = 0) -> subprocess.CompletedProcess:
    """examples/train_mla.py under torchrun on 2 processes; with `faults` (`--fault-*` options), the same
    main through tests/fault_entry.py."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += [f"--max-restarts={max_restarts}", FAULT_ENTRY if faults else SCRIPT, *faults, *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=full_env, cwd=ROOT)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("ckpt-cli-cache"))


@pytest.fixture(scope="module")
def reference(cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    result = torchrun([*COMMON, f"data.cache_dir={cache_dir}", f"train.out_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _curve(out: Path) -> list[tuple]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("split"), r["loss"], r.get("grad_norm"), r.get("lr")) for r in records]


def _assert_same_run(out: Path, reference: Path) -> None:
    assert _curve(out) == _curve(reference)
    assert [s for s, split, *_ in _curve(out) if split is None] == [1, 2, 3, 4, 5, 6]
    final = (out / "final" / "model.safetensors").read_bytes()
    assert final == (reference / "final" / "model.safetensors").read_bytes()


def test_sigterm_saves_and_the_resumed_run_continues_bit_for_bit(cache_dir, reference, tmp_path):
    args = [*COMMON, f"data.cache_dir={cache_dir}", f"train.out_dir={tmp_path}"]
    stopped = torchrun(args, faults=["--fault-sigterm-step=3"])  # rank 1 only: every rank must stop
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "stopping: SIGTERM: stopped after step 3, checkpoint saved" in stopped.stdout
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-00000002", "step-00000003"]
    assert (checkpoints / "latest").read_text().strip() == "step-00000003"
    resumed = torchrun(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoints / 'step-00000003'} (step 3" in resumed.stdout
    assert "same layout: RNG states restored" in resumed.stdout
    _assert_same_run(tmp_path, reference)
    # keep_last=3 (the default): steps 3, 4 and 6 are left
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "latest",
        "step-00000003",
        "step-00000004",
        "step-00000006",
    ]


def test_a_killed_worker_is_restarted_by_torchrun_and_resumes_from_the_last_checkpoint(
    cache_dir, reference, tmp_path
):
    args = [*COMMON, f"data.cache_dir={cache_dir}", f"train.out_dir={tmp_path}"]
    result = torchrun(args, faults=["--fault-kill-step=3"], max_restarts=1)  # SIGKILL, rank 1, step 3
    assert result.returncode == 0, result.stderr[-3000:]
    # A real kill, seen by torchrun: rank 1's SIGKILL (-9), or, when torchrun notices rank 0's broken
    # collective first, its SIGTERM of the survivors (-15); either way the attempt failed and restarted.
    assert "exitcode: -9" in result.stderr or "exitcode: -15" in result.stderr, result.stderr[-3000:]
    assert f"resumed from {tmp_path / 'checkpoints' / 'step-00000002'} (step 2" in result.stdout
    _assert_same_run(tmp_path, reference)


@pytest.mark.parametrize("async_save", [False, True])
def test_a_kill_during_a_save_leaves_the_previous_checkpoint_usable(
    async_save, cache_dir, reference, tmp_path
):
    """With `train.async_save` the kill comes in the background writer, after rank 1's files are written
    and before the commit, while the training thread has already gone on to step 5."""
    args = [
        *COMMON,
        f"data.cache_dir={cache_dir}",
        f"train.out_dir={tmp_path}",
        f"train.async_save={async_save}",
    ]
    result = torchrun(args, faults=["--fault-kill-in-save=4"], max_restarts=1)
    assert result.returncode == 0, result.stderr[-3000:]
    incomplete = tmp_path / "checkpoints" / "step-00000004.tmp"
    # the restarted run removes the dead save's folder before choosing (train/rundir.py)
    assert f"warning: removing {incomplete}: a save that did not finish" in result.stderr
    assert f"resumed from {tmp_path / 'checkpoints' / 'step-00000002'} (step 2" in result.stdout
    _assert_same_run(tmp_path, reference)
