"""Reliability in one process: who owns `train.out_dir`, which checkpoint `resume` follows, how many
non-finite steps are tolerated, what Ctrl-C does, and that a NaN validation loss never ends well.

The torchrun side (two "nodes", errors on one rank, SIGINT under torchrun) is in
tests/test_reliability_cli.py.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_checkpoint import TRAIN, _train_once, cache_dir  # noqa: F401 (a fixture)

from parallel import checkpoint
from parallel.checkpoint.format import FORMAT
from parallel.topology import ParallelDims, Topology
from train.faults import FaultPlan, NonFiniteError, StepGuard
from train.lineage import find_auto, make_head
from train.rundir import LOCK, RunDirError, claim, release


def _claim(out_dir, resume="never", overwrite=False, warnings=None):
    return claim(
        out_dir, resume, overwrite, (warnings if warnings is not None else []).append, lambda m: None
    )


def _files(folder: Path) -> dict:
    """Every file under `folder` with its bytes and modification time: equal means untouched."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def _old_run(folder: Path) -> Path:
    (folder / "checkpoints" / "step-00000004").mkdir(parents=True)
    (folder / "config.yaml").write_text("model: {}\n")
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    return folder


def test_a_second_run_on_a_locked_out_dir_is_refused_naming_the_holder(tmp_path):
    lock = _claim(tmp_path)
    with pytest.raises(
        RunDirError, match=rf"in use by another run \(host {socket.gethostname()}, pid {os.getpid()}"
    ):
        _claim(tmp_path)
    release(lock)
    assert not (tmp_path / LOCK).exists()  # the lock goes with the run
    release(_claim(tmp_path))  # and the folder is free again


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    record = {"host": socket.gethostname(), "pid": int(dead.stdout), "job": None, "started": "earlier"}
    (tmp_path / LOCK).write_text(json.dumps(record))
    warnings = []
    lock = _claim(tmp_path, warnings=warnings)
    assert any("stale lock" in w and "not running" in w for w in warnings), warnings
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    release(lock)


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused_and_touches_nothing(tmp_path):
    run = _old_run(tmp_path / "run")
    before = _files(run)
    with pytest.raises(
        RunDirError, match=r"holds a run \(checkpoints, config.yaml, metrics.jsonl\).*train.resume"
    ):
        _claim(run)
    assert _files(run) == before and not (run / LOCK).exists()


def test_overwrite_moves_the_old_run_aside_and_deletes_nothing(tmp_path):
    run = _old_run(tmp_path / "run")
    before = _files(run)
    release(_claim(run, overwrite=True))
    (aside,) = tmp_path.glob("run.replaced-*")
    assert _files(aside) == {k: v for k, v in before.items()}  # bytes and times kept
    assert sorted(p.name for p in run.iterdir()) == []


def test_resume_auto_enters_a_folder_holding_a_run_and_removes_a_dead_save(tmp_path):
    run = _old_run(tmp_path / "run")
    (run / "checkpoints" / "step-00000006.tmp").mkdir()
    warnings = []
    release(_claim(run, resume="auto", warnings=warnings))
    assert not (run / "checkpoints" / "step-00000006.tmp").exists()  # a save that died, no checkpoint
    assert (run / "checkpoints" / "step-00000004").is_dir() and any("did not finish" in w for w in warnings)


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda tmp: "", "expected a folder"),
        (lambda tmp: (tmp / "f").write_text("x") and tmp / "f", "is a file, expected a folder"),
        (lambda tmp: (tmp / "f").write_text("x") and tmp / "f" / "run", "cannot create the folder"),
    ],
)
def test_an_unusable_out_dir_is_a_one_line_error_naming_it(tmp_path, make, fragment):
    out_dir = make(tmp_path)
    with pytest.raises(RunDirError) as error:
        _claim(out_dir)
    assert fragment in str(error.value) and f"train.out_dir={str(out_dir)!r}" in str(error.value)
    assert "\n" not in str(error.value)


def _fake_checkpoint(root: Path, step: int) -> Path:
    path = root / checkpoint.step_name(step)
    path.mkdir(parents=True)
    (path / checkpoint.MANIFEST).write_text(json.dumps({"format": FORMAT, "files": {}, "step": step}))
    return path


def test_resume_auto_follows_latest_not_the_highest_step(tmp_path):
    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "latest").write_text("step-00000004\n")
    found, notes = find_auto(tmp_path)
    assert found == tmp_path / "step-00000004"
    assert len(notes) == 1 and "step-00000006" in notes[0] and "newer than" in notes[0]
    (tmp_path / "step-00000004" / checkpoint.MANIFEST).unlink()  # latest broken: the newest older valid one
    found, notes = find_auto(tmp_path)
    assert found == tmp_path / "step-00000002" and any("incomplete" in n for n in notes)


def test_a_rollback_moves_the_later_checkpoints_aside_and_becomes_latest(tmp_path):
    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "latest").write_text("step-00000006\n")
    done = make_head(tmp_path, tmp_path / "step-00000002", 2)
    assert len(done) == 1 and "moved 2 checkpoint(s)" in done[0]
    (aside,) = tmp_path.glob("superseded-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step-00000004", "step-00000006"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000002"
    assert find_auto(tmp_path) == (tmp_path / "step-00000002", [])


def _guard(max_skipped, steps):
    return StepGuard(
        Topology(dims=ParallelDims(), rank=0, local_rank=0, device=torch.device("cpu")),
        "skip",
        max_skipped,
        steps,
    )


def test_more_than_max_skipped_steps_in_a_row_is_an_error():
    guard, nan, one = _guard(3, 1000), torch.tensor(math.nan), torch.tensor(1.0)
    assert [guard.skip_step(s, nan, one, True) for s in (1, 2, 3)] == [True] * 3
    assert guard.skip_step(4, one, one, True) is False  # a good step ends the row
    for s in (5, 6, 7):
        guard.skip_step(s, nan, one, True)
    with pytest.raises(
        NonFiniteError, match=r"4 non-finite steps in a row, 7 in all, at step 8.*max_skipped_steps=3"
    ):
        guard.skip_step(8, nan, one, True)


def test_more_than_five_percent_skipped_in_all_is_an_error():
    guard, nan, one = _guard(2, 100), torch.tensor(math.nan), torch.tensor(1.0)
    for s in range(1, 11, 2):  # never 3 in a row; 5 = 5% of 100 in all is still allowed
        guard.skip_step(s, nan, one, True)
        guard.skip_step(s + 1, one, one, True)
    with pytest.raises(NonFiniteError, match=r"6 in all"):
        guard.skip_step(11, nan, one, True)


def test_sigint_asks_for_a_checkpoint_and_a_second_one_stops_at_once():
    with _guard(None, 10) as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.signalled == 2  # no KeyboardInterrupt: the step ends, a checkpoint is saved
        with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_rollback_then_a_crash_then_auto_continues_the_rolled_back_line(cache_dir, tmp_path, capfd):  # noqa: F811
    """A run of 6 steps (checkpoints 2, 4, 6); rolled back to step 2 and stopped by SIGINT after step 3;
    `auto` must continue from step 3, not from the abandoned 6, and end as the uninterrupted run did."""
    common = [*TRAIN, f"data.cache_dir={cache_dir}", "train.save_every=2", f"train.out_dir={tmp_path}"]
    _train_once(common)
    reference = (tmp_path / "final" / "model.safetensors").read_bytes()
    root = tmp_path / "checkpoints"
    from train.config import load_config
    from train.trainer import train_once

    stopped = train_once(
        load_config(None, [*common, f"train.resume={root / 'step-00000002'}"]),
        faults=FaultPlan(sigint_step=3),
    )
    assert stopped["stop_reason"] == "SIGINT: stopped after step 3, checkpoint saved"
    (aside,) = root.glob("superseded-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step-00000004", "step-00000006"]
    capfd.readouterr()
    _train_once([*common, "train.resume=auto"])
    assert f"resumed from {root / 'step-00000003'} (step 3" in capfd.readouterr().out
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == reference


def test_a_resume_past_train_steps_or_with_another_tokenizer_is_refused_touching_nothing(cache_dir, tmp_path):  # noqa: F811
    from train.config import ConfigError, load_config
    from train.data.tokenizer import train_tokenizer
    from train.trainer import train_once

    run = tmp_path / "run"
    args = [*TRAIN, f"data.cache_dir={cache_dir}", f"train.out_dir={run}", "train.resume=auto"]
    _train_once(args)
    before = _files(run)
    with pytest.raises(ConfigError, match=r"step-00000006 is at step 6, past train.steps=4"):
        train_once(load_config(None, [*args, "train.steps=4"]))
    assert _files(run) == before  # config.yaml, metrics.jsonl, checkpoints: untouched
    # a tokenizer of the same vocabulary size, trained on other text: the saved token ids mean other text
    other = tmp_path / "tokenizer.json"
    train_tokenizer(iter(["zebra quantum " * 50, "lorem ipsum dolor " * 80]), 300).save(str(other))
    with pytest.raises(ConfigError, match=r"trained with another tokenizer \(sha256 "):
        train_once(load_config(None, [*args, f"data.tokenizer={other}", "train.steps=8"]))
    assert _files(run) == before


def test_a_nan_validation_loss_is_an_error_and_writes_no_final(cache_dir, tmp_path, monkeypatch):  # noqa: F811
    """Validation before training is real; the one after step 6 is NaN (a broken model)."""
    from train.config import load_config
    from train.runner import ModelRunner
    from train.trainer import train_once

    real, calls = ModelRunner.evaluate, []

    def evaluate(self, windows):
        calls.append(1)
        return real(self, windows) if len(calls) == 1 else math.nan

    monkeypatch.setattr(ModelRunner, "evaluate", evaluate)
    with pytest.raises(NonFiniteError, match=r"validation loss nan at step 6.*final/ not written"):
        train_once(load_config(None, [*TRAIN, f"data.cache_dir={cache_dir}", f"train.out_dir={tmp_path}"]))
    assert not (tmp_path / "final").exists() and (tmp_path / "checkpoints" / "step-00000006").is_dir()


def test_a_phase_that_ends_between_report_and_exit_does_not_end_the_process():
    import time

    from train.watchdog import Watchdog

    reports, exits = [], []
    watchdog = Watchdog(rank=0, seconds=4.0, on_hang=reports.append, on_exit=lambda: exits.append(1))
    watchdog.phase("step 1: slow")
    time.sleep(3.6)  # past 85% of the limit (reported), before 95%
    watchdog.phase("step 2: fine")
    time.sleep(0.5)
    watchdog.close()
    assert len(reports) == 1 and exits == [], (reports, exits)


def test_the_watchdog_names_the_rank_and_the_phase_it_hangs_in():
    import time

    from train.watchdog import Watchdog

    reports, exits = [], []
    watchdog = Watchdog(rank=3, seconds=0.4, on_hang=reports.append, on_exit=lambda: exits.append(1))
    watchdog.phase("step 5: gradient norm (all-reduce over tp/pp/dp)")
    time.sleep(0.2)
    assert reports == [] and exits == []  # within the limit
    time.sleep(1.5)
    watchdog.close()
    assert len(reports) == 1 and exits == [1], (reports, exits)  # reported once, then the process ended
    assert reports[0].startswith("error: [rank 3] hung for ") and "in step 5: gradient norm" in reports[0]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("distributed.startup_timeout_s=60", "distributed.startup_timeout_s=60.0: expected a value >= "),
        (
            "distributed.timeout_s=.inf",
            "distributed.timeout_s=inf: expected a number of seconds > 0 and finite",
        ),
        ("train.max_skipped_steps=-1", "train.max_skipped_steps=-1: expected a value >= 0"),
    ],
)
def test_timeouts_and_the_skip_budget_are_checked(override, fragment):
    from train.config import ConfigError, load_config

    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert fragment in str(error.value)


def _prepare(corpus: Path, tmp_path: Path, **overrides):
    from train.data import prepare_dataset

    logs = []
    kwargs = dict(tokenizer=None, vocab_size=300, cache_dir=str(tmp_path / "cache"), max_corpus_mb=None)
    kwargs.update(val_fraction=0.05, is_builder=True, barrier=lambda: None, log=logs.append)
    return prepare_dataset(str(corpus), **{**kwargs, **overrides}), logs


def test_bytes_that_are_not_utf8_are_an_error_naming_the_file_or_replaced_and_counted(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"doc{i:02d}.txt").write_text(f"def f{i}(x):\n    return x + {i}\n" * 20)
    (corpus / "doc07.txt").write_bytes(b"caf\xe9 au lait\n" * 40)  # Latin-1, not UTF-8
    with pytest.raises(
        ValueError, match=r"doc07.txt is not UTF-8 text \(byte 0xe9 at offset 3\).*encoding_errors"
    ):
        _prepare(corpus, tmp_path)
    dataset, logs = _prepare(corpus, tmp_path, encoding_errors="replace")
    assert any("1 files had bytes that are not UTF-8" in line for line in logs), logs


def test_the_validation_split_stays_near_val_fraction_with_two_uneven_documents(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("small document\n" * 10)
    (corpus / "b.txt").write_text("".join(f"line {i} of the large document\n" for i in range(3000)))
    dataset, logs = _prepare(corpus, tmp_path)
    share = len(dataset.val_tokens) / (len(dataset.val_tokens) + len(dataset.train_tokens))
    assert 0.04 <= share <= 0.06, share  # a split by document would hold out one of the two: 50% or more
    assert any(
        "validation split: the last tokens of the corpus, 5.0% of the tokens" in line for line in logs
    ), logs


def test_the_corpus_cap_applies_to_the_bytes_read_of_a_single_huge_file(tmp_path):
    huge = tmp_path / "one-line.txt"
    huge.write_text("word " * 400_000)  # 2 MB on one line
    dataset, logs = _prepare(huge, tmp_path, max_corpus_mb=0.05)
    tokens = len(dataset.val_tokens) + len(dataset.train_tokens)
    assert tokens <= 0.05 * 2**20, tokens  # at most one token per byte of the 52,428 read
    assert any("(0.05 MiB)" in line for line in logs), logs


def test_settings_without_effect_are_named_and_overrides_may_follow_the_config_file(tmp_path):
    from train.config import load_config
    from train.layout import ignored_settings

    config = load_config(
        None, ["distributed.sequence_parallel=true", "data.tokenizer=t.json", "data.vocab_size=999"]
    )
    notes = ignored_settings(config, tp=1, vocab_size=512)
    assert notes[0].startswith("distributed.sequence_parallel=true has no effect with tp=1")
    assert notes[1].startswith("data.vocab_size=999 is unused") and "(512 tokens)" in notes[1]
    assert ignored_settings(load_config(None, []), tp=1, vocab_size=512) == []
    (tmp_path / "c.yaml").write_text("train:\n  steps: 3\n")
    script = Path(__file__).resolve().parents[1] / "examples" / "train_mla.py"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "train.seed=7",
            "--config",
            str(tmp_path / "c.yaml"),
            "train.steps=5",
            "--print-config",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "steps: 5" in result.stdout and "seed: 7" in result.stdout


def test_a_section_given_twice_in_yaml_is_an_error(tmp_path):
    from train.config import ConfigError, load_config

    (tmp_path / "c.yaml").write_text("train:\n  steps: 3\nmodel:\n  hidden_size: 64\ntrain:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=r"'train' appears twice in one mapping"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize(
    "option, fragment",
    [
        ("--gpu-memory=nan", "--gpu-memory=nan"),
        ("--gpu-memory=-5", "--gpu-memory=-5.0"),
        ("--top=0", "--top=0"),
    ],
)
def test_the_planner_refuses_bad_numbers(option, fragment, capsys):
    from train.plan import main

    config = Path(__file__).resolve().parents[1] / "examples" / "configs"
    first = sorted(config.glob("*.yaml"))[0]
    assert main(["--config", str(first), "--gpus", "1", "--gpu", "h100", option]) == 2
    assert fragment in capsys.readouterr().err


def test_a_cache_dir_that_is_a_file_is_refused_before_any_work(tmp_path):
    from train.config import load_config
    from train.context import RunContext
    from train.rundir import claim_for_run

    (tmp_path / "cache").write_text("not a folder")
    config = load_config(None, [f"data.cache_dir={tmp_path / 'cache'}", f"train.out_dir={tmp_path / 'run'}"])
    context = RunContext(Topology(dims=ParallelDims(), rank=0, local_rank=0, device=torch.device("cpu")), "")
    with pytest.raises(RunDirError, match=r"data.cache_dir='.*cache': is a file, expected a folder"):
        claim_for_run(config, context)
    assert not (tmp_path / "run").exists()
