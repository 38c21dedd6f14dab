"""Test-only entry point: examples/train_mla.py's `main`, with a `train.faults.FaultPlan` built from its
own options. Run it where train_mla.py would run (directly, or as torchrun's script):

    python tests/fault_entry.py [--fault-nan-step K] [--fault-kill-step K] [--fault-sigterm-step K]
        [--fault-sigint-step K] [--fault-error-step K] [--fault-hang-step K]
        [--fault-kill-in-save K] [--fault-oom STEP:MICROBATCH,...] [--fault-rank R] [--fault-once FILE]
        [train_mla.py args]

Which process meets the faults is decided here, so the library never looks at the environment for
them: rank `--fault-rank` (default 1; with only `--fault-nan-step`, every rank unless it is given), and
only on torchrun's first attempt (TORCHELASTIC_RESTART_COUNT unset or 0) except for NaN, so that a
restarted worker resumes cleanly. With several torchrun agents ("nodes") each agent counts its own
restarts, so `--fault-once FILE` decides instead: the faults fire in the first process that finds no FILE
(it creates it).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train.faults import FaultPlan  # noqa: E402


def parse_oom(spec: str) -> list[tuple[int, int]]:
    """ "3:2,3:1" -> [(3, 2), (3, 1)]."""
    return [tuple(int(x) for x in item.split(":")) for item in spec.split(",") if item]


def fault_plan(args: argparse.Namespace, rank: int, first_attempt: bool) -> FaultPlan | None:
    """The faults this process meets (see the module docstring), or None."""
    others = {
        "kill_step": args.fault_kill_step,
        "sigterm_step": args.fault_sigterm_step,
        "sigint_step": args.fault_sigint_step,
        "error_step": args.fault_error_step,
        "hang_step": args.fault_hang_step,
        "kill_in_save_step": args.fault_kill_in_save,
        "oom": parse_oom(args.fault_oom),
    }
    fault_rank = args.fault_rank if args.fault_rank is not None else 1
    chosen = {}
    if args.fault_nan_step is not None and args.fault_rank in (None, rank):
        chosen["nan_step"] = args.fault_nan_step
    if first_attempt and rank == fault_rank:
        chosen.update({k: v for k, v in others.items() if v})
    return FaultPlan(**chosen) if chosen else None


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, add_help=False)
    for name in (
        "nan-step",
        "kill-step",
        "sigterm-step",
        "sigint-step",
        "error-step",
        "hang-step",
        "kill-in-save",
        "rank",
    ):
        parser.add_argument(f"--fault-{name}", type=int)
    parser.add_argument("--fault-oom", default="")
    parser.add_argument("--fault-once")
    args, rest = parser.parse_known_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if args.fault_once:
        fault_rank = args.fault_rank if args.fault_rank is not None else 1
        first_attempt = rank == fault_rank and not Path(args.fault_once).exists()
        if first_attempt:
            Path(args.fault_once).touch()
    spec = importlib.util.spec_from_file_location("train_mla", ROOT / "examples" / "train_mla.py")
    train_mla = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_mla)
    train_mla.main(rest, faults=fault_plan(args, rank, first_attempt))


if __name__ == "__main__":
    main(sys.argv[1:])
