"""Shared helpers for the benchmark scripts: a gloo world on 127.0.0.1, timing, tables and JSON.

A benchmark is a function `fn(rank, world_size, *args) -> dict` run on every rank of a fresh world
spawned by `run_world`; rank 0's dict comes back to the parent process. Timings are taken between two
barriers, so one figure is the time until every rank has finished the step, and repeated with warm-up;
medians are reported because these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/x.py` without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

WORLD_TIMEOUT_S = 300


def parse_args(name: str, description: str) -> argparse.Namespace:
    """`--quick` (a smoke run, well under a minute) and `--json OUT`.

    The default output is benchmarks/results/<name>.json, or <name>_quick.json for a smoke run, so that
    a smoke run never overwrites the figures of a full one.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="few repetitions: a smoke run")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    args = parser.parse_args()
    if args.json is None:
        args.json = RESULTS_DIR / (f"{name}_quick.json" if args.quick else f"{name}.json")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_path: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=WORLD_TIMEOUT_S)
    )
    try:
        result = fn(rank, world_size, *args)
        dist.barrier()
        if rank == 0:
            Path(out_path).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run_world(fn: Callable[..., dict], *args: Any, world_size: int = 2) -> dict:
    """Run `fn(rank, world_size, *args)` on a fresh gloo world; return rank 0's (JSON-able) result.

    `fn` must be a module-level function (it is pickled into spawned processes). If any rank raises,
    the others are terminated and the error, with its traceback, is raised here.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(world_size, free_port(), fn, args, out_path), nprocs=world_size, join=True)
        return json.loads(Path(out_path).read_text())


def timed(step: Callable[[], Any], group: dist.ProcessGroup | None = None) -> float:
    """Seconds from a barrier to the barrier after `step()`: the step time of the slowest rank."""
    dist.barrier(group)
    start = time.perf_counter()
    step()
    dist.barrier(group)
    return time.perf_counter() - start


def interleaved_times(
    steps: dict[str, Callable[[], Any]], warmup: int, repeats: int, group: dist.ProcessGroup | None = None
) -> dict[str, list[float]]:
    """Time every step `repeats` times, interleaved, after `warmup` untimed rounds.

    Round i runs the steps in order, rotated by i (A B C, B C A, C A B, ...), so slow drift of the
    machine and any advantage of going first or last fall on every step alike.
    """
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            timed(steps[name], group)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(steps[name], group))
    return times


def summary(seconds: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and min of a list of times, in milliseconds."""
    ms = sorted(1e3 * s for s in seconds)
    q1, _, q3 = statistics.quantiles(ms, n=4) if len(ms) > 1 else (ms[0], ms[0], ms[0])
    return {"median_ms": statistics.median(ms), "q1_ms": q1, "q3_ms": q3, "min_ms": ms[0], "n": len(ms)}


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of numerator[i] / denominator[i] (robust to drift between rounds)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def paired_difference_ms(minuend: Sequence[float], subtrahend: Sequence[float]) -> float:
    """Median over rounds of minuend[i] - subtrahend[i], in milliseconds."""
    return 1e3 * statistics.median(a - b for a, b in zip(minuend, subtrahend, strict=True))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table, columns padded so it also reads well in a terminal."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[c]) for row in cells) for c in range(len(headers))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def machine_info() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "backend": "gloo",
        "threads_per_rank": 1,
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine_info(), **payload}, indent=2) + "\n")
    print(f"\nwrote {path}")
