"""Reliability through the command line under real torchrun agents: two "nodes" on 127.0.0.1 surviving
a killed worker, Ctrl-C, a second run refused on an owned folder, an error met by one rank only.

Same small run as tests/test_checkpoint_cli.py (dp=2, ZeRO-1, 8-bit AdamW, 6 steps, a checkpoint every
2 steps, `train.resume=auto`), launched by benchmarks/fault_trials.py's `launch` (which the kill-restart
figures in benchmarks/RESULTS.md come from). Faults come from tests/fault_entry.py's `--fault-*` options.
"""

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fault_trials import TINY, launch, same_run  # noqa: E402

COMMON = [*TINY, "train.steps=6"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("reliability-cli-cache"))


@pytest.fixture(scope="module")
def reference(cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    code, output = launch("single", [*COMMON, f"data.cache_dir={cache_dir}", f"train.out_dir={out}"], [], 300)
    assert code == 0, output[-3000:]
    return out


def test_two_nodes_restart_after_a_killed_worker_and_end_bit_for_bit(cache_dir, reference, tmp_path):
    """Two torchrun agents, c10d rendezvous, rank 1 SIGKILLed after step 3, `--max-restarts=3`: the new
    round must agree on its store keys on both nodes (the agents' restart counts differ: only the
    killed worker's agent counts a restart) and continue from step 2 to the uninterrupted result."""
    args = [*COMMON, f"data.cache_dir={cache_dir}", f"train.out_dir={tmp_path / 'run'}"]
    faults = ["--fault-kill-step=3", f"--fault-once={tmp_path / 'fired'}"]
    code, output = launch("two-node", args, faults, 300)
    assert code == 0, f"exit {code} (None: hung past 300 s)\n{output[-4000:]}"
    assert (tmp_path / "fired").exists()  # the kill did happen
    assert same_run(tmp_path / "run", reference)


def test_sigint_saves_a_second_run_is_refused_and_one_ranks_error_is_printed(cache_dir, tmp_path):
    out = tmp_path / "run"
    args = [*COMMON, f"data.cache_dir={cache_dir}", f"train.out_dir={out}"]
    # Ctrl-C on rank 1 only after step 3: every rank stops after that step, with a checkpoint
    code, output = launch("single", args, ["--fault-sigint-step=3"], 300)
    assert code == 0, output[-3000:]
    assert "stopping: SIGINT: stopped after step 3, checkpoint saved" in output
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # a fresh run into the folder holding that run: refused with one line, nothing touched
    code, output = launch("single", [*args, "train.resume=never"], [], 300, max_restarts=0)
    assert code != 0, output[-3000:]
    assert "holds a run (checkpoints, config.yaml, final, metrics.jsonl) and train.resume=never" in output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    # an OSError on rank 1 alone: printed by rank 1, with its rank, once
    args = [*args, "train.overwrite=true", "train.resume=never"]
    code, output = launch("single", args, ["--fault-error-step=2"], 300, max_restarts=0)
    assert code != 0
    line = "error: [rank 1] injected error on this process at step 2 (a test FaultPlan)"
    assert output.count(line) == 1, output[-3000:]
    (aside,) = tmp_path.glob("run.replaced-*")  # overwrite moved the SIGINT run aside, whole
    assert {aside / p.relative_to(out): b for p, b in files.items()} == {
        p: p.read_bytes() for p in aside.rglob("*") if p.is_file()
    }


def test_a_hung_worker_is_named_by_the_watchdog_within_the_timeout(cache_dir, tmp_path):
    """Rank 1 stops responding after step 2's backward; rank 0 waits in that step's collectives. With
    `distributed.timeout_s=8` the watchdogs name the ranks and their phases within seconds (not the 600 s
    default, nor the start-up timeout), and the job ends with an error instead of hanging."""
    args = [
        *COMMON,
        f"data.cache_dir={cache_dir}",
        f"train.out_dir={tmp_path / 'run'}",
        "distributed.timeout_s=8",
        "distributed.startup_timeout_s=600",
    ]
    start = time.monotonic()
    code, output = launch("single", args, ["--fault-hang-step=2"], 200, max_restarts=0)
    elapsed = time.monotonic() - start
    assert code not in (0, None), f"exit {code} (None: still hung after 200 s)\n{output[-3000:]}"
    assert "error: [rank 0] hung for" in output, output[-3000:]
    assert "error: [rank 1] hung for" in output and "step 2" in output, output[-3000:]
    assert elapsed < 150, elapsed  # the 8 s limit, plus start-up: not the 600 s start-up timeout
