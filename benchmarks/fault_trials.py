"""Kill-restart trials: does a run whose worker is SIGKILLed recover under torchrun and end identical?

    python benchmarks/fault_trials.py --trials 20 [--modes single,two-node] [--steps 6] [--json FILE]

One uninterrupted reference run (2 processes, dp=2, ZeRO-1, 8-bit AdamW, a checkpoint every 2 steps),
then N trials per mode, each killing rank 1 with SIGKILL after step k (k cycles over 2 .. steps-1) under
`--max-restarts=3` and `train.resume=auto`:

- `single`: one torchrun agent with 2 processes (`--standalone`);
- `two-node`: two torchrun agents of 1 process each on 127.0.0.1, c10d rendezvous (`--nnodes=2`), the
  way two machines run it; the killed worker's agent restarts, the other agent's worker is restarted by
  the new rendezvous round.

A trial *recovered* when the job exits 0 within its time limit, and is *identical* when its loss curve
(`metrics.jsonl`: loss, gradient norm, learning rate, validation loss) and final weights
(`final/model.safetensors`) equal the reference's bit for bit. A trial past its limit is a hang (killed).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY = str(ROOT / "tests" / "fault_entry.py")
TINY = [
    *("model.hidden_size=64", "model.num_layers=4", "model.num_heads=4", "model.q_lora_rank=32"),
    *("model.kv_lora_rank=32", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8"),
    *("model.v_head_dim=16", "model.intermediate_size=128", "model.max_seq_len=64"),
    *("data.vocab_size=512", "data.seq_len=32", "data.max_corpus_mb=0.5", "train.global_batch_size=8"),
    *("train.log_every=1", "train.eval_every=0", "train.eval_batches=1", "train.sample_tokens=0"),
    *("optim.lr=1e-4", "optim.min_lr=1e-5", "optim.warmup_steps=0", "train.grad_clip=0.5"),
    *("train.save_every=2", "distributed.dp=2", "distributed.zero_stage=1", "optim.name=adamw8bit"),
    "train.resume=auto",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nodes: str, port: int, host: bool, max_restarts: int) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--max-restarts={max_restarts}"]
    cmd.append("--monitor-interval=0.5")
    if nodes == "single":
        return [*cmd, "--standalone", "--nproc-per-node=2"]
    return [
        *cmd,
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=fault-trial",
        f"--rdzv-conf=is_host={int(host)}",
        "--local-addr=127.0.0.1",
    ]


def launch(
    mode: str, args: list[str], faults: list[str], timeout: float, max_restarts: int = 3
) -> tuple[int | None, str]:
    """Run one job (`mode` single or two-node); (exit code, None on a hang; the combined output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    port = free_port()
    agents = [True] if mode == "single" else [True, False]
    procs = [
        subprocess.Popen(
            [*_torchrun(mode, port, host, max_restarts), ENTRY, *faults, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
            start_new_session=True,  # a hang is ended by killing the agent's whole process group
        )
        for host in agents
    ]
    deadline, codes, outputs = time.monotonic() + timeout, [], []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            codes.append(proc.returncode)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            codes.append(None)
        outputs.append(out)
    code = None if None in codes else max(codes, key=abs)
    return code, "\n".join(outputs)


def curve(out: Path) -> list[tuple]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("split"), r["loss"], r.get("grad_norm"), r.get("lr")) for r in records]


def same_run(out: Path, reference: Path) -> bool:
    final = out / "final" / "model.safetensors"
    return (
        final.exists()
        and curve(out) == curve(reference)
        and final.read_bytes() == (reference / "final" / "model.safetensors").read_bytes()
    )


def trials(modes: list[str], n: int, steps: int, timeout: float, work: Path) -> dict:
    common = [*TINY, f"train.steps={steps}", f"data.cache_dir={work / 'cache'}"]
    reference = work / "reference"
    code, output = launch("single", [*common, f"train.out_dir={reference}"], [], timeout)
    if code != 0:
        raise SystemExit(f"the reference run failed (exit {code}):\n{output[-3000:]}")
    results = {}
    for mode in modes:
        row = {"trials": n, "recovered": 0, "identical": 0, "hangs": 0, "seconds": []}
        for i in range(n):
            kill_step = 2 + i % max(1, steps - 2)
            out = work / f"{mode}-{i}"
            faults = [f"--fault-kill-step={kill_step}", f"--fault-once={work / f'{mode}-{i}.fired'}"]
            start = time.monotonic()
            code, output = launch(mode, [*common, f"train.out_dir={out}"], faults, timeout)
            row["seconds"].append(round(time.monotonic() - start, 1))
            row["hangs"] += code is None
            row["recovered"] += code == 0
            row["identical"] += code == 0 and same_run(out, reference)
            if code != 0:
                print(f"{mode} trial {i} (kill after step {kill_step}): exit {code}\n{output[-2000:]}")
        results[mode] = row
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--modes", default="single,two-node")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per job before it is a hang")
    parser.add_argument("--json", default="fault_trials.json")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if args.trials < 1 or args.steps < 3 or any(m not in ("single", "two-node") for m in modes):
        parser.error("--trials >= 1, --steps >= 3, --modes from single,two-node")
    with tempfile.TemporaryDirectory() as work:
        results = trials(modes, args.trials, args.steps, args.timeout, Path(work))
    print(f"{'mode':<10} {'trials':>6} {'recovered':>9} {'identical':>9} {'hangs':>5} {'median s':>8}")
    for mode, row in results.items():
        median = sorted(row["seconds"])[len(row["seconds"]) // 2]
        print(
            f"{mode:<10} {row['trials']:>6} {row['recovered']:>9} {row['identical']:>9} {row['hangs']:>5} "
            f"{median:>8}"
        )
    Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
