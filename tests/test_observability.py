"""Observability: experiment trackers, the step-time breakdown, profiler traces, asynchronous saves.

Tiny in-process runs (tests/test_checkpoint.py's TRAIN model); two-rank runs use the pooled gloo workers.
wandb runs in offline mode: its run folder (`out_dir/wandb/offline-run-*/run-<id>.wandb`) is read back
record by record; TensorBoard's event files with tensorboard's own reader.
"""

import glob
import json
import struct
import sys
import time
from pathlib import Path

import pytest
from dist_harness import run_distributed
from test_checkpoint import TRAIN, _train_once
from test_checkpoint import cache_dir as cache_dir  # noqa: F401 (the token-cache fixture)

from train.trackers import Trackers, scalars

BREAKDOWN = ("time_data_s", "time_compute_s", "time_comm_s", "time_optimizer_s", "time_checkpoint_s")


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _wandb_records(path: Path) -> list:
    """The records of a `.wandb` file: a log of 32 KiB blocks of records, each with a 7-byte header
    (crc32, length, type: 1 full, 2 first, 3 middle, 4 last), after a 7-byte file header; each record is
    a wandb `Record` protobuf."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, block, data, records = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        data += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(data))
            data = b""
    return records


def _wandb_history(out: Path) -> tuple[str, list[dict]]:
    """(run id, history rows) of the one offline run under `out/wandb/`."""
    (path,) = map(Path, glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb")))
    deadline = time.monotonic() + 60  # wandb's service process may still be writing after finish()
    while not any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(path)):
        assert time.monotonic() < deadline, f"{path} has no exit record after 60 s"
        time.sleep(0.2)
    rows = []
    for record in _wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    return path.stem.removeprefix("run-"), rows


def _assert_tracked(records: list[dict], rows: list[dict]) -> None:
    """Every number of every metrics.jsonl record is in the wandb row of its step, under its prefix."""
    by_step: dict[int, dict] = {}
    for row in rows:
        by_step.setdefault(row["_step"], {}).update(row)
    for record in records:
        step, values = scalars(record)
        for tag, value in values.items():
            assert by_step[step][tag] == pytest.approx(value, rel=1e-12), (step, tag)  # JSON round trip


def test_wandb_offline_holds_every_metric_and_a_resumed_run_keeps_its_id(cache_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    common = [*TRAIN, f"data.cache_dir={cache_dir}", "train.eval_every=2", "train.wandb={project: t}"]
    first, second = tmp_path / "first", tmp_path / "second"
    _train_once([*common, f"train.out_dir={first}", "train.steps=3"])
    run_id, rows = _wandb_history(first)
    _assert_tracked(_records(first), rows)
    assert {r["_step"] for r in rows if "val/loss" in r} == {0, 2, 3}
    saved = json.loads((first / "checkpoints" / "step-00000003" / "manifest.json").read_text())
    assert saved["state"]["wandb_run_id"] == run_id
    # the resumed run writes into another out_dir here only so that its wandb folder is its own
    _train_once([*common, f"train.out_dir={second}", f"train.resume={first}", "train.steps=5"])
    resumed_id, resumed_rows = _wandb_history(second)
    assert resumed_id == run_id
    _assert_tracked([r for r in _records(second) if r["step"] > 3], resumed_rows)


def test_tensorboard_profile_and_breakdown_in_one_run(cache_dir, tmp_path):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = [*TRAIN, f"data.cache_dir={cache_dir}", f"train.out_dir={out}", "train.tensorboard=true"]
    _train_once([*args, "train.profile_steps=[2,4]", "train.async_save=true"])
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    records = _records(out)
    expected = [(r["step"], r["loss"]) for r in records if "split" not in r]
    assert logged == [(s, pytest.approx(v, rel=1e-6)) for s, v in expected]  # stored as float32
    assert [e.step for e in events.Scalars("val/loss")] == [0, 6]
    _assert_breakdown(records, steps_with_save=[4])  # save_every=3: step 3's save is in step 4's record
    trace = json.loads((out / "profile" / "rank-00000.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"data", "compute", "forward", "backward", "optimizer", "checkpoint"} <= names


def _assert_breakdown(records: list[dict], steps_with_save: list[int]) -> None:
    """The phases add up to the step time within 5% (the statements between phases are not in any).

    These test steps last ~15 ms, so the few hundred microseconds of bookkeeping between phases (more on
    a loaded machine, and the profiler's own step) can pass 5% of one; 2 ms of absolute slack covers
    that without hiding a missing phase, which would cost a whole forward, backward or optimizer step."""
    for record in (r for r in records if "split" not in r):
        parts = sum(record[key] for key in BREAKDOWN)
        assert parts == pytest.approx(record["time_step_s"], rel=0.05, abs=2e-3), record
        assert min(record[key] for key in BREAKDOWN) >= 0, record
        assert (record["time_checkpoint_s"] > 0) == (record["step"] in steps_with_save), record


def test_two_ranks_profile_collectives_and_count_blocked_communication(cache_dir, tmp_path):  # noqa: F811
    out = tmp_path / "dp2"
    args = [*TRAIN, f"data.cache_dir={cache_dir}", f"train.out_dir={out}", "distributed.dp=2"]
    run_distributed(2, _train_once, [*args, "distributed.zero_stage=1", "train.profile_steps=[2,2]"])
    records = _records(out)
    _assert_breakdown(records, steps_with_save=[4])
    # the non-finite check and ZeRO's reductions block every step
    assert all(r["time_comm_s"] > 0 for r in records if "split" not in r)
    for rank in (0, 1):
        trace = json.loads((out / "profile" / f"rank-{rank:05d}.json").read_text())
        names = {event.get("name") for event in trace["traceEvents"]}
        assert {"forward", "backward", "optimizer", "all_reduce"} <= names, sorted(n for n in names if n)


def _checkpoint_files(out: Path) -> dict[str, bytes]:
    root = out / "checkpoints"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("world", [1, 2])
def test_async_save_writes_the_same_bytes_as_sync_and_the_same_curve(world, cache_dir, tmp_path):  # noqa: F811
    args = [*TRAIN, f"data.cache_dir={cache_dir}", "train.keep_last=2", f"distributed.dp={world}"]
    runs = {}
    for mode in ("false", "true"):
        out = tmp_path / f"async-{mode}"
        run = [*args, f"train.out_dir={out}", f"train.async_save={mode}"]
        run_distributed(2, _train_once, run) if world == 2 else _train_once(run)
        runs[mode] = out
    sync, background = _checkpoint_files(runs["false"]), _checkpoint_files(runs["true"])
    assert sorted(sync) == sorted(background) and any(name.endswith("manifest.json") for name in sync)
    for name in sync:
        if name.endswith("manifest.json"):  # the resolved config inside differs in these two keys only
            a, b = json.loads(sync[name]), json.loads(background[name])
            assert a["config"]["train"].pop("async_save") is False and b["config"]["train"].pop("async_save")
            for manifest in (a, b):
                manifest["config"]["train"].pop("out_dir")
            assert a == b, name
        else:
            assert sync[name] == background[name], name  # shards, rank records, `latest`: byte for byte
    curve = [[(r["step"], r["loss"], r.get("grad_norm")) for r in _records(out)] for out in runs.values()]
    assert curve[0] == curve[1]


def test_a_tracker_that_cannot_start_is_a_one_line_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    warnings = []
    trackers = Trackers({"project": "x"}, False, tmp_path, True, warn=warnings.append)
    trackers.log({"step": 1, "loss": 1.0})
    trackers.close()
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith("wandb tracking is off: could not start it (ModuleNotFoundError")
    assert warnings[0].endswith("pip install 'mla-parallel[wandb]'")
    assert trackers.run_id is None


def test_trackers_only_on_rank_0_and_only_numbers(tmp_path):
    assert Trackers({"project": "x"}, True, tmp_path, is_main=False).writer is None
    assert not (tmp_path / "tensorboard").exists()
    step, values = scalars({"step": 3, "split": "val", "loss": 2.0, "perplexity": 7.4, "note": "x"})
    assert (step, values) == (3, {"val/loss": 2.0, "val/perplexity": 7.4})


def test_progress_line_prints_percent_and_the_last_line_once(monkeypatch):
    import io

    from train.progress import Progress

    clock = iter([0.0, 0.5, 2.5, 3.0, 4.0, 9.0])  # start, then one reading per set() / close()
    monkeypatch.setattr("train.progress.time.perf_counter", lambda: next(clock))
    out = io.StringIO()
    progress = Progress("data: tokenizing", 8 * 2**20, "MiB", scale=2**20, stream=out)
    progress.update(2**20)  # 0.5 s: too soon, nothing printed
    progress.update(2**20)  # 2.5 s: printed
    progress.update(2**20)  # 3.0 s: too soon after the last line
    progress.track(8 * 2**20, 8 * 2**20)  # 4.0 s: too soon; `track` sets done and total
    progress.close()  # 9.0 s: the final line
    assert out.getvalue().splitlines() == [
        "data: tokenizing: 25% (2/8 MiB), 2 s, about 8 s left",
        "data: tokenizing: 100% (8/8 MiB), 9 s",
    ]


def test_save_async_returns_before_the_write_commits_only_at_the_end_and_reports_errors(tmp_path):
    """The training thread gets control back while the writer is held inside its write; the checkpoint
    becomes visible (renamed, `latest`) only when the writer is let go; a writer's error reaches wait()."""
    import threading

    import torch

    from parallel import checkpoint

    model = torch.nn.Linear(4, 3)
    before = model.weight.detach().clone()
    release, written = threading.Event(), threading.Event()

    def hold() -> None:
        written.set()
        assert release.wait(30)

    pending = checkpoint.save_async(tmp_path / "step-00000001", model, step=1, on_written=hold)
    assert written.wait(30)
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on: the checkpoint keeps the state copied at the call
    assert not pending.done() and not (tmp_path / "step-00000001").exists()
    assert (tmp_path / "step-00000001.tmp").is_dir() and not (tmp_path / "latest").exists()
    release.set()
    path = pending.wait()
    assert checkpoint.verify(path) is None and (tmp_path / "latest").read_text() == "step-00000001\n"
    assert torch.equal(checkpoint.read_full(path, "param/weight"), before)

    def fail() -> None:
        raise OSError("disk full")

    pending = checkpoint.save_async(tmp_path / "step-00000002", model, step=2, on_written=fail)
    with pytest.raises(RuntimeError, match="background checkpoint save failed: disk full"):
        pending.wait()
    assert checkpoint.find_latest(tmp_path)[0] == path  # the failed one never became valid


def test_on_cuda_only_the_logged_steps_synchronize_and_count(monkeypatch):
    """Synchronizing every phase of every step would drain a GPU's queue: unlogged steps do neither."""
    import torch

    from train.timing import StepTimer

    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    timer = StepTimer(enabled=True, device=torch.device("cuda"))
    for logged in (False, False, True):
        with timer.step(logged):
            timer.switch("compute")
    assert timer.steps == 1 and len(syncs) == 4  # step start, phase start, phase end, step end
    record = timer.record()
    assert record["time_step_s"] >= record["time_compute_s"] > 0
