"""Run every benchmark and print one table of the ratios each of them exists to measure.

    python benchmarks/run_all.py [--quick] [--only NAME ...] [--out DIR] [--timeout SECONDS]

Every `benchmarks/bench_*.py` runs as its own subprocess, one after the other, with `--quick` passed on
and `--json DIR/<name>.json`; its output goes to DIR/<name>.log. A script that fails or runs past its
time limit is reported (with the end of its log) and the others still run; the exit status is 1 if any
failed. Then one small function per benchmark reads its headline figures out of its JSON (a missing
key shows as "n/a") and a single table is printed: benchmark, wall time, status, headline, value, the
goal stated for it (if there is one) and whether it is met. The summary is also written to
DIR/summary.json, and the table to DIR/summary.md.

DIR defaults to benchmarks/results/run_all_quick/ with --quick and benchmarks/results/run_all/ without.
Every figure is a ratio against a baseline measured in the same run of the same script,
because the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
TIMEOUT_QUICK_S = 300.0  # per script; a quick run of each takes well under a minute on a quiet machine
TIMEOUT_FULL_S = 3600.0
LOG_TAIL_LINES = 20

NA = "n/a"

# ---------------------------------------------------------------------------------------- reading JSON


def get(data: Any, *path: str | int) -> Any:
    """`data[path[0]][path[1]]...`, or NA if any step is missing or of the wrong type."""
    for key in path:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return NA
    return data


def num(data: Any, *path: str | int) -> float | str:
    """The number at `path` as a float, or NA (missing, not a number, or not finite)."""
    value = get(data, *path)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return NA
    return float(value)


def items(data: Any, *path: str | int) -> list[dict]:
    """The dicts in the list at `path` (anything else in it is skipped); [] if there is no list."""
    value = get(data, *path)
    return [x for x in value if isinstance(x, dict)] if isinstance(value, list) else []


def fmt_g(value: Any) -> str:
    """A number in a label, short (25.0 -> "25"); anything else as it is."""
    return f"{value:g}" if isinstance(value, int | float) and not isinstance(value, bool) else str(value)


def div(a: float | str, b: float | str) -> float | str:
    return NA if NA in (a, b) or b == 0 else a / b


def sub(a: float | str, b: float | str) -> float | str:
    return NA if NA in (a, b) else a - b


# ---------------------------------------------------------------------------------------- goals


@dataclass(frozen=True)
class Goal:
    text: str
    check: Callable[[float], bool]


def at_most(limit: float, text: str | None = None) -> Goal:
    return Goal(text or f"<= {limit:g}", lambda v: v <= limit)


def below(limit: float, text: str | None = None) -> Goal:
    return Goal(text or f"< {limit:g}", lambda v: v < limit)


def within(target: float, tolerance: float, text: str) -> Goal:
    return Goal(text, lambda v: abs(v - target) <= tolerance)


def headline(label: str, value: float | str, goal: Goal | None = None) -> dict:
    """One row of the summary: what is measured, its value, the goal and whether it is met."""
    if goal is None:
        met = ""
    elif value == NA:
        met = NA
    else:
        met = "yes" if goal.check(value) else "no"
    return {"label": label, "value": value, "goal": goal.text if goal else "", "met": met}


# ---------------------------------------------------------------------------------------- headlines
# One function per benchmark: its JSON (as written by the script) -> its headline rows. The goals are
# those the project set for each benchmark; a headline without one is context (e.g. the ideal TP speed-up).


def data_parallel(r: dict) -> list[dict]:
    """Our DataParallel / torch DDP step time per bucket size (goal: <= 1.0)."""
    return [
        headline(
            f"ours / DDP step time, {fmt_g(get(v, 'bucket_cap_mb'))} MB buckets",
            num(v, "median_paired_ratio"),
            at_most(1.0),
        )
        for v in items(r, "variants") or [{}]
    ]


def tokens(run: dict, key: str) -> int:
    """batch x seq of the [batch, seq, ...] list at `run[key]`; 0 if there is none."""
    shape = get(run, key)
    ok = isinstance(shape, list) and len(shape) >= 2 and all(isinstance(n, int) for n in shape[:2])
    return shape[0] * shape[1] if ok else 0


def shape_text(run: dict, key: str) -> str:
    shape = get(run, key)
    return "x".join(map(str, shape)) if isinstance(shape, list) else NA


def tensor_parallel(r: dict) -> list[dict]:
    """At the largest input: tp=2 speed-up over tp=1 and bytes moved / the MLA latent minimum."""
    runs = items(r, "runs")
    most = max((tokens(x, "shape") for x in runs), default=0)
    largest = [x for x in runs if tokens(x, "shape") == most] or [{}]
    p = get(r, "world_size")
    rows = []
    for x in largest:
        rows.append(
            headline(
                f"tp={p} speed-up over tp=1, q_lora_rank={get(x, 'q_lora_rank')}, "
                f"input {shape_text(x, 'shape')}",
                num(x, "speedup_paired"),
            )
        )
    for x in largest:
        rows.append(
            headline(
                f"bytes / MLA latent minimum, q_lora_rank={get(x, 'q_lora_rank')}",
                div(num(x, "measured", "total", "bytes"), num(x, "minimum", "latent", "total")),
            )
        )
    return rows


SCHEDULES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved_1f1b": "interleaved 1F1B", "zb1p": "ZB-H1"}


def pipeline(r: dict) -> list[dict]:
    """Per schedule at the largest m: idle time measured - theory, and idle / 1F1B's."""
    measured = [x for x in items(r, "rows") if "schedule" in x]
    ms = [m for x in measured if (m := num(x, "m")) != NA]
    m = max(ms, default=NA)
    at_m = {x["schedule"]: x for x in measured if num(x, "m") == m}
    p = get(at_m, "1f1b", "p")
    rows = []
    for key, name in SCHEDULES.items():
        x = at_m.get(key, {})
        theory, source = num(x, "bubble_formula"), "formula"
        if theory == NA:  # ZB-H1 has no closed form: the simulator with the measured stage costs
            theory, source = num(x, "bubble_simulated"), "simulator"
        points = div(sub(num(x, "bubble_measured"), theory), 0.01)
        rows.append(
            headline(
                f"{name} idle - theory ({source}), points, p={p} m={fmt_g(m)}",
                points,
                within(0.0, 5.0, "within 5 points"),
            )
        )
    one_f_one_b = num(at_m.get("1f1b", {}), "bubble_measured")
    for key in ("interleaved_1f1b", "zb1p"):
        rows.append(
            headline(
                f"{SCHEDULES[key]} idle / 1F1B idle",
                div(num(at_m.get(key, {}), "bubble_measured"), one_f_one_b),
                below(1.0),
            )
        )
    return rows


def zero(r: dict) -> list[dict]:
    """Bytes per parameter against our formula and the paper's; step time against DDP and torch ZeRO."""
    memory = items(r, "memory")
    ratios = [div(num(x, "measured_per_param_total"), num(x, "ours_formula_per_param_total")) for x in memory]
    worst = NA if not ratios or NA in ratios else max(ratios, key=lambda v: abs(v - 1))
    rows = [
        headline(
            f"bytes/param measured / our formula, worst of {len(memory)}",
            worst,
            within(1.0, 0.05, "within 5%"),
        )
    ]
    dps = [dp for x in memory if (dp := num(x, "dp")) != NA]
    dp = max(dps, default=NA)
    for stage in (1, 2, 3):
        found = [
            x
            for x in memory
            if x.get("precision") == "bf16" and x.get("stage") == stage and num(x, "dp") == dp
        ]
        x = found[0] if found else {}
        rows.append(
            headline(
                f"stage {stage} bytes/param measured / paper (its grads fp16, ours fp32), dp={get(x, 'dp')}",
                div(num(x, "measured_per_param_total"), num(x, "paper_per_param")),
            )
        )
    run = max(items(r, "step_time", "runs"), key=lambda x: tokens(x, "batch_per_rank"), default={})
    batch = shape_text(run, "batch_per_rank")
    variants = get(run, "variants")
    rows.append(
        headline(
            f"stage 1 / torch ZeroRedundancyOptimizer step time, batch {batch}",
            num(variants, "ours stage 1", "paired_ratio_vs_torch_zero"),
            at_most(1.0),
        )
    )
    for stage in (1, 2, 3):
        rows.append(
            headline(
                f"stage {stage} / DDP + AdamW step time, batch {batch}",
                num(variants, f"ours stage {stage}", "paired_ratio_vs_ddp_adamw"),
                at_most(1.0),
            )
        )
    return rows


def adam8bit(r: dict) -> list[dict]:
    """AdamW8bit / fused AdamW step time at 1 thread, at the default thread count and with a busy
    process on another core (goals: <= 5x, and busy <= 2x the quiet figure); against bitsandbytes and
    torchao when they were timed; optimizer-state bytes per parameter."""
    runs = items(r, "step_time")
    quiet = [x for x in runs if get(x, "busy") is not True]
    busy = next((x for x in runs if get(x, "busy") is True), {})
    rows = []
    for run in quiet:
        threads, variants = get(run, "threads"), get(run, "variants")
        ours = num(variants, "ours AdamW8bit", "ratio_to_fused_paired")
        rows.append(headline(f"AdamW8bit / fused AdamW step time, {threads} thread(s)", ours, at_most(5.0)))
        for other in ("bitsandbytes AdamW8bit", "torchao AdamW8bit"):  # rows only when they were timed
            if isinstance(variants, dict) and other in variants:
                theirs = num(variants, other, "ratio_to_fused_paired")
                rows.append(
                    headline(
                        f"AdamW8bit / {other} step time, {threads} thread(s)", div(ours, theirs), below(1.0)
                    )
                )
    if busy:
        same = next((x for x in quiet if num(x, "threads") == num(busy, "threads")), {})
        ratio = div(
            num(get(busy, "variants"), "ours AdamW8bit", "ratio_to_fused_paired"),
            num(get(same, "variants"), "ours AdamW8bit", "ratio_to_fused_paired"),
        )
        rows.append(headline("AdamW8bit / fused, busy core / quiet", ratio, at_most(2.0)))
    rows.append(
        headline(
            "AdamW8bit state bytes/param, small config (fp32 AdamW: 8)",
            num(r, "state_memory", "bytes_per_parameter_ours"),
            at_most(2.04),
        )
    )
    return rows


def zero_memory(r: dict) -> list[dict]:
    """Per-rank peak and between-step memory of our ZeRO against its peer (goal: <= 1)."""
    rows = []
    for name, ratio in (get(r, "ratios") if isinstance(get(r, "ratios"), dict) else {}).items():
        for key, what in (("peak_ratio", "peak"), ("between_ratio", "between-step")):
            rows.append(
                headline(f"{name} / {get(ratio, 'peer')} {what} memory", num(ratio, key), at_most(1.0))
            )
    return rows or [headline("ZeRO memory ratios", NA)]


def qlora(r: dict) -> list[dict]:
    """NF4 dequantize and quantize against the peers, QLoRA / bf16 LoRA step time, and the NF4 bits per
    parameter of the decoder linears."""
    formats = {x.get("format"): x for x in items(r, "weight_memory", "rows")}
    peers = [
        headline(
            f"NF4 dequantize / bitsandbytes, to {get(x, 'dtype')}",
            num(x, "dequantize_over_bitsandbytes"),
            at_most(1.5),
        )
        for x in items(r, "dequantize", "rows")
        if isinstance(x, dict) and "dequantize_over_bitsandbytes" in x
    ]
    quantize = get(r, "quantize", "rows")
    for peer in ("bitsandbytes", "torchao"):  # rows only when they were timed
        if isinstance(quantize, dict) and peer in quantize:
            peers.append(
                headline(f"NF4 quantize / {peer}", num(quantize, peer, "ours_over_peer"), below(1.0))
            )
    return peers + [
        headline("QLoRA / bf16 LoRA step time", num(r, "training_step", "qlora_over_bf16_lora")),
        headline(
            "NF4 bits/param, decoder linears",
            num(formats.get("NF4"), "bits_per_param_linear"),
            within(4.5, 0.001, "4.5"),
        ),
        headline(
            "NF4 + double quant bits/param, decoder linears",
            num(formats.get("NF4 + double quant"), "bits_per_param_linear"),
            within(4.127, 0.001, "about 4.127"),
        ),
    ]


def generate(r: dict) -> list[dict]:
    """Decoding speed-up of the latent cache over recomputing the prefix; KV cache size MHA / MLA."""
    tokens = get(r, "speed", "new_tokens")
    rows = [
        headline(
            f"{mode} speed-up over no cache, {tokens} tokens",
            num(r, "speed", "modes", mode, "speedup_vs_no_cache"),
        )
        for mode in ("latent cache", "absorbed")
    ]
    for x in items(r, "cache") or [{}]:
        model = str(get(x, "model")).split(" (")[0]
        rows.append(headline(f"KV cache bytes MHA / MLA, {model}", num(x, "ratio")))
    return rows


def moe(r: dict) -> list[dict]:
    """MoE layer step time over a dense MLP of the same active FLOPs, per case (no goal stated)."""
    return [
        headline(f"MoE / dense MLP step time, {get(x, 'case')}", num(x, "moe_over_dense"))
        for x in items(r, "cases") or [{}]
    ]


def expert_parallel(r: dict) -> list[dict]:
    """All-to-all bytes over the derived minimum (goal: exactly 1), ep=2 / ep=1 MoE layer step time on
    gloo (no goal: two CPU ranks), expert weights + AdamW state per rank at ep=2 over ep=1 (goal: 1/2)."""
    return [
        headline(
            "EP all-to-all bytes / derived minimum", num(r, "bytes_over_minimum"), within(1.0, 0.0, "= 1")
        ),
        headline("EP ep=2 / ep=1 MoE layer step time (gloo)", num(r, "ep2_over_ep1")),
        headline(
            "EP expert weights + state per rank, ep=2 / ep=1",
            num(r, "memory_ep2_over_ep1"),
            within(0.5, 1e-9, "= 1/2"),
        ),
    ]


def context_parallel(r: dict) -> list[dict]:
    """Latent exchange bytes against the derived minimum; K/V / latent bytes; cp=2 attention speed-up;
    activation memory per rank against the estimator at cp=2."""
    cp2 = [x for x in items(r, "memory") if get(x, "cp") == 2] or [{}]
    return [
        headline(
            "latent all-gather bytes / derived minimum", num(r, "forward_bytes_over_minimum"), at_most(1.0)
        ),
        headline(
            "K/V / latent bytes per token, DeepSeek-V2", num(r, "deepseek_v2_32k_bf16", "kv_over_latent")
        ),
        headline(f"cp=2 attention speed-up over cp=1, {get(r, 'seq')} tokens", num(r, "speedup_paired")),
        headline("cp=2 speed-up over cp=1, same latent attention", num(r, "speedup_over_latent_cp1_paired")),
        headline("cp=2 ring / all-gather step time", num(r, "ring_over_all_gather_paired")),
        headline("cp=2 saved activations / estimate", num(cp2[0], "measured_over_estimate")),
    ]


def async_save(r: dict) -> list[dict]:
    """Training time lost to a checkpoint save, asynchronous over synchronous."""
    return [
        headline("async / sync save, training blocked", num(r, "blocked_ratio_async_over_sync")),
        headline(
            "async / sync save, blocked + overlapped-step slowdown",
            num(r, "cost_ratio_async_over_sync"),
            below(1.0),
        ),
    ]


EXTRACTORS: dict[str, Callable[[dict], list[dict]]] = {
    "bench_data_parallel": data_parallel,
    "bench_tensor_parallel": tensor_parallel,
    "bench_pipeline": pipeline,
    "bench_zero": zero,
    "bench_adam8bit": adam8bit,
    "bench_zero_memory": zero_memory,
    "bench_qlora": qlora,
    "bench_generate": generate,
    "bench_moe": moe,
    "bench_expert_parallel": expert_parallel,
    "bench_async_save": async_save,
    "bench_context_parallel": context_parallel,
}


def headlines(name: str, result: dict) -> list[dict]:
    """The headline rows of benchmark `name`; never raises (a broken JSON gives n/a rows)."""
    extract = EXTRACTORS.get(name)
    if extract is None:
        return [headline("no headline function in run_all.py for this benchmark", NA)]
    try:
        return extract(result if isinstance(result, dict) else {})
    except Exception as error:  # a schema this function did not foresee: report, do not crash the run
        return [headline(f"reading the JSON failed: {type(error).__name__}: {error}", NA)]


# ---------------------------------------------------------------------------------------- running


def discover() -> list[Path]:
    return sorted(BENCH_DIR.glob("bench_*.py"))


def select(scripts: list[Path], only: Sequence[str] | None) -> list[Path]:
    """The scripts named in `only` ("zero", "bench_zero" or "bench_zero.py"), in suite order."""
    if not only:
        return scripts
    by_name = {s.stem: s for s in scripts}
    wanted = []
    for name in only:
        stem = Path(name).name.removesuffix(".py")
        stem = stem if stem.startswith("bench_") else f"bench_{stem}"
        if stem not in by_name:
            known = ", ".join(s.stem.removeprefix("bench_") for s in scripts)
            raise SystemExit(f"run_all.py: unknown benchmark {name!r}; known: {known}")
        wanted.append(stem)
    return [s for s in scripts if s.stem in wanted]


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the script and the rank processes it spawned (they share its new process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def children_cpu_s() -> float:
    """CPU seconds (user + system) of all waited-for child processes so far, their own children included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_script(script: Path, out_dir: Path, quick: bool, timeout: float) -> dict:
    """Run one benchmark script; its status, wall time and JSON (or {} when it produced none)."""
    name = script.stem
    json_path, log_path = out_dir / f"{name}.json", out_dir / f"{name}.log"
    json_path.unlink(missing_ok=True)  # never read a previous run's figures as this run's
    command = [sys.executable, str(script), *(["--quick"] if quick else []), "--json", str(json_path)]
    start, cpu_start = time.perf_counter(), children_cpu_s()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            returncode = None
        except BaseException:  # Ctrl-C: take its rank processes down too
            _kill_group(proc)
            raise
    wall_s = time.perf_counter() - start
    cpu_s = children_cpu_s() - cpu_start  # on a shared machine, a load-independent measure of the work

    result: dict = {}
    if returncode is None:
        status = f"TIMED OUT after {timeout:g} s"
    elif returncode < 0:
        status = f"FAILED (killed by signal {-returncode})"
    elif returncode != 0:
        status = f"FAILED (exit {returncode})"
    elif not json_path.exists():
        status = "FAILED (no JSON written)"
    else:
        try:
            result = json.loads(json_path.read_text())
            status = "ok"
        except json.JSONDecodeError as error:
            status = f"FAILED (unreadable JSON: {error})"
    return {
        "name": name,
        "script": str(script.relative_to(REPO_ROOT) if script.is_relative_to(REPO_ROOT) else script),
        "command": " ".join(command),
        "status": status,
        "returncode": returncode,
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "json": str(json_path),
        "log": str(log_path),
        "headlines": headlines(name, result),
        "_result": result,
    }


# ---------------------------------------------------------------------------------------- reporting


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool]) -> str:
    """A markdown table padded for the terminal; `right[i]` right-aligns column i."""
    cells = [list(headers)] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(row[c]) for row in cells) for c in range(len(headers))]

    def line(row: list[str]) -> str:
        padded = (v.rjust(w) if r else v.ljust(w) for v, w, r in zip(row, widths, right, strict=True))
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if r else (":" + "-" * (w + 1)) for w, r in zip(widths, right, strict=True)
        )
        + "|"
    )
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def summary_table(runs: list[dict]) -> str:
    headers = ["benchmark", "wall s", "status", "headline", "value", "goal", "met"]
    rows = []
    for run in runs:
        for i, h in enumerate(run["headlines"]):
            first = i == 0
            rows.append(
                [
                    run["name"].removeprefix("bench_") if first else "",
                    f"{run['wall_s']:.1f}" if first else "",
                    run["status"] if first else "",
                    h["label"],
                    h["value"],
                    h["goal"],
                    h["met"],
                ]
            )
    return table(headers, rows, right=[False, True, False, False, True, False, False])


def log_tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script (a smoke run)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these (e.g. zero pipeline)")
    parser.add_argument("--out", type=Path, default=None, help="where the JSON, logs and summary go")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per script")
    args = parser.parse_args(argv)
    out_dir = args.out or RESULTS_DIR / ("run_all_quick" if args.quick else "run_all")
    timeout = args.timeout or (TIMEOUT_QUICK_S if args.quick else TIMEOUT_FULL_S)
    out_dir.mkdir(parents=True, exist_ok=True)
    scripts = select(discover(), args.only)

    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load_before = load_average()
    start = time.perf_counter()
    runs = []
    for i, script in enumerate(scripts, 1):
        print(
            f"[{i}/{len(scripts)}] {script.name}{' --quick' if args.quick else ''} ... ", end="", flush=True
        )
        run = run_script(script, out_dir, args.quick, timeout)
        print(f"{run['status']}, {run['wall_s']:.1f} s (CPU {run['cpu_s']:.1f} s)", flush=True)
        if run["status"] != "ok":
            print(f"  end of {run['log']}:\n{log_tail(run['log'])}", flush=True)
        runs.append(run)
    total_s = time.perf_counter() - start
    load_after = load_average()

    failed = [run["name"] for run in runs if run["status"] != "ok"]
    torch_version = next((get(r["_result"], "machine", "torch") for r in runs if r["_result"]), NA)
    text = summary_table(runs)
    print(f"\n{text}\n")
    print(
        f"total wall time {total_s:.1f} s (CPU {sum(r['cpu_s'] for r in runs):.1f} s) for {len(runs)} "
        f"script(s) on {os.cpu_count()} cores; load average before/after: "
        f"{load_before} / {load_after}"
    )
    summary = {
        "date": started,
        "command": " ".join(["python", "benchmarks/run_all.py", *(sys.argv[1:] if argv is None else argv)]),
        "quick": args.quick,
        "timeout_per_script_s": timeout,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch_version,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "total_wall_s": total_s,
        "total_cpu_s": sum(run["cpu_s"] for run in runs),
        "failed": failed,
        "benchmarks": [{k: v for k, v in run.items() if k != "_result"} for run in runs],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "summary.md").write_text(text + "\n")
    print(
        f"wrote {out_dir / 'summary.json'}, {out_dir / 'summary.md'} (each script's JSON and log beside them)"
    )
    if failed:
        print(f"FAILED: {', '.join(failed)} (see their logs above and in {out_dir})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
