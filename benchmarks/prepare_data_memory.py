"""prepare_data on a large generated JSONL corpus: peak memory (RSS) and tokens per second.

    python benchmarks/prepare_data_memory.py [--size-mb 1024] [--workers 2] [--dir DIR]

Generates SIZE MiB of JSONL records (random words, ~2 KiB each), trains a 4,096-token byte-level BPE on
its first 4 MiB (so the tokenizer is not what is measured), then runs `python -m train.prepare_data` on
it in a subprocess and samples the resident memory of that process and all its children (the encoding
workers) every 0.1 s from /proc. Reported: the peak of that sum, wall time, tokens written and tokens/s;
and, as the baseline measured in the same run, the time of one plain read of the file (the I/O floor:
the run also content-hashes it once). Acceptance: the peak stays under 1 GiB whatever the corpus size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train.data.tokenizer import train_tokenizer  # noqa: E402

WORDS = [f"w{i}" for i in range(3000)] + ["the", "of", "and", "tensor", "pipeline", "latent", "data"]


def generate(path: Path, size_mb: float) -> None:
    rng = random.Random(0)
    target = int(size_mb * (1 << 20))
    with open(path, "w") as f:
        written = 0
        while written < target:
            line = json.dumps({"text": " ".join(rng.choices(WORDS, k=400))}) + "\n"
            f.write(line)
            written += len(line)


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and its descendants."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration, ValueError):
            continue
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=float, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    if not corpus.exists() or corpus.stat().st_size < args.size_mb * (1 << 20):
        generate(corpus, args.size_mb)
    with open(corpus) as f:
        sample = [f.readline() for _ in range(2000)]
    tok = train_tokenizer((json.loads(x)["text"] for x in sample if x), 4096)
    tok.save(str(work / "tokenizer.json"))
    started = time.perf_counter()
    with open(corpus, "rb") as f:
        while f.read(1 << 24):
            pass
    read_s = time.perf_counter() - started
    command = [
        sys.executable,
        "-m",
        "train.prepare_data",
        f"data.corpus={corpus}",
        f"data.tokenizer={work / 'tokenizer.json'}",
        f"data.cache_dir={work / 'cache'}",
        f"data.num_workers={args.workers}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.1)
    seconds = time.perf_counter() - started
    output = proc.stdout.read()
    print(output)
    if proc.returncode:
        raise SystemExit(f"prepare_data failed ({proc.returncode})")
    summary = output.strip().splitlines()[-1]
    tokens = sum(int(summary.split(": ")[1].split()[i]) for i in (0, 3))
    result = {
        "size_mib": corpus.stat().st_size / (1 << 20),
        "workers": args.workers,
        "peak_rss_mib": peak / (1 << 20),
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "plain_read_s": read_s,
        "time_vs_plain_read": seconds / read_s,
    }
    print(json.dumps(result, indent=2))
    (ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "results" / "prepare_data.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
