"""Random-search hyper-parameter sweeps: `python -m train.sweep --trials N --out DIR --param KEY=SPEC ...`.

    python -m train.sweep --trials 8 --out runs/sweep --param optim.lr=loguniform:1e-4:1e-2 \\
        --param optim.schedule=choice:cosine,wsd [--config FILE] [--nproc N] [--max-loss X] [overrides]

SPEC is `choice:a,b,c` (each value read as YAML, like a command-line override), `uniform:lo:hi` or
`loguniform:lo:hi` (log-uniform: exp(U(ln lo, ln hi)), lo > 0); a uniform draw for an integer key (e.g.
`optim.warmup_steps`) is rounded. Trial i draws its values from one generator seeded by `--seed`, so a
sweep is reproducible; every trial uses the same `train.seed`, so trials differ only by their parameters.

Each trial is one `train.train_once` run into DIR/trial-NNN/ (its own config.yaml, metrics.jsonl, final/
and log.txt): in this process for `--nproc 1`, else one `torchrun --standalone --nproc-per-node N`
subprocess per trial. Results go to DIR/results.jsonl (one line per trial, written as each finishes);
the summary printed at the end ranks the trials best first by final validation loss, then those that
diverged, then those that failed; DIR/best.yaml is the best trial's configuration (with
`train.out_dir: DIR/best`), to be rerun with `examples/train_mla.py --config DIR/best.yaml`.

Early stop: a trial stops at the first logged training loss that is NaN/inf or, with `--max-loss X`,
above X (`train.max_loss`, checked every `train.log_every` steps); it is then ranked as diverged.

Validation is the held-out split of the corpus, as in any run: for language modelling with far more
tokens than one run reads, one fixed held-out split measures generalisation well, and k-fold
cross-validation (which pays for k runs per trial to reuse scarce data) is not needed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import subprocess
import sys
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from models.config import MLAConfig
from train.config import SECTIONS, Config, ConfigError, dump_config, load_config
from train.context import fail

SPEC_FORM = "expected KEY=SPEC with SPEC one of choice:a,b,c  uniform:lo:hi  loguniform:lo:hi"
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Param:
    """One swept key and how its values are drawn."""

    key: str
    kind: str  # choice | uniform | loguniform
    choices: tuple[str, ...] = ()
    low: float = 0.0
    high: float = 0.0

    def sample(self, rng: random.Random) -> str:
        """The value of one trial, as override text (`key=<text>`)."""
        if self.kind == "choice":
            return rng.choice(self.choices)
        if self.kind == "uniform":
            value = rng.uniform(self.low, self.high)
        else:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return str(round(value)) if _is_integer_key(self.key) else repr(value)


def parse_param(text: str) -> Param:
    """`KEY=SPEC` as a `Param`; a one-line ValueError naming the argument when malformed."""
    key, sep, spec = text.partition("=")
    kind, _, rest = spec.partition(":")
    key = key.strip()
    if not sep or "." not in key or not rest:
        raise ValueError(f"--param {text!r}: {SPEC_FORM}")
    if kind == "choice":
        choices = tuple(v.strip() for v in rest.split(",") if v.strip())
        if not choices:
            raise ValueError(f"--param {text!r}: choice needs at least one value")
        return Param(key, kind, choices=choices)
    if kind not in ("uniform", "loguniform"):
        raise ValueError(f"--param {text!r}: unknown kind {kind!r}; {SPEC_FORM}")
    bounds = rest.split(":")
    try:
        low, high = (float(b) for b in bounds)
    except ValueError:
        raise ValueError(f"--param {text!r}: {kind} needs two numbers lo:hi") from None
    if not low <= high or (kind == "loguniform" and low <= 0):
        need = "0 < lo <= hi" if kind == "loguniform" else "lo <= hi"
        raise ValueError(f"--param {text!r}: expected {need}")
    return Param(key, kind, low=low, high=high)


def _is_integer_key(key: str) -> bool:
    section, _, name = key.partition(".")
    cls = MLAConfig if section == "model" else SECTIONS.get(section)
    hint = typing.get_type_hints(cls).get(name) if cls is not None else None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint is int


def _value(config: Config, key: str):
    section, _, name = key.partition(".")
    return config.model.get(name) if section == "model" else getattr(getattr(config, section), name)


def _summary(result: dict) -> dict:
    """The JSON-friendly part of a `train_once` result (histories stay in metrics.jsonl)."""
    keep = ("val_loss", "val_perplexity", "final_loss", "first_val_loss", "tokens", "elapsed_s", "out_dir")
    out = {k: result[k] for k in keep}
    out["stop_reason"] = result.get("stop_reason")
    diverged = result.get("stopped_early") or not math.isfinite(result["val_loss"])
    out["status"] = "diverged" if diverged else "ok"
    return out


def _run_in_process(config: Config, trial_dir: Path) -> dict:
    from train.trainer import train_once

    with (trial_dir / "log.txt").open("w") as log, contextlib.redirect_stdout(log):
        try:
            return _summary(train_once(config))
        except (ConfigError, ValueError, RuntimeError) as err:
            return {"status": "failed", "error": " ".join(str(err).split())}


def _run_torchrun(config: Config, trial_dir: Path, nproc: int) -> dict:
    trial_yaml, result_file = trial_dir / "trial.yaml", trial_dir / "result.json"
    dump_config(config, trial_yaml)
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "train.sweep", "--run-trial", str(trial_yaml), "--result", str(result_file)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    with (trial_dir / "log.txt").open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode == 0 and result_file.is_file():
        return json.loads(result_file.read_text())
    lines = (trial_dir / "log.txt").read_text().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    return {"status": "failed", "error": errors[0][7:] if errors else f"exit code {proc.returncode}"}


def _run_trial_worker(trial_yaml: str, result_file: str) -> None:
    """Entry point of one torchrun rank of a trial: train, and rank 0 writes the summary."""
    from train.trainer import train_once

    try:
        result = _summary(train_once(load_config(trial_yaml)))
    except (ConfigError, ValueError) as err:
        fail(str(err).splitlines()[0] if str(err) else repr(err))
    if int(os.environ.get("RANK", "0")) == 0:
        Path(result_file).write_text(json.dumps(result))


def rank_trials(records: list[dict]) -> list[dict]:
    """Best first: finished trials by validation loss, then diverged, then failed (each by trial index)."""
    order = {"ok": 0, "diverged": 1, "failed": 2}
    return sorted(
        records,
        key=lambda r: (
            order[r["status"]],
            r.get("val_loss", math.inf) if r["status"] == "ok" else 0,
            r["trial"],
        ),
    )


def _print_summary(ranked: list[dict], keys: list[str]) -> None:
    header = ["rank", "trial", "status", "val_loss", "val_ppl", *keys]
    rows = []
    for place, r in enumerate(ranked, 1):
        loss = f"{r['val_loss']:.4f}" if "val_loss" in r else "-"
        ppl = f"{r['val_perplexity']:.2f}" if "val_perplexity" in r else "-"
        params = [
            f"{r['params'][k]:.4g}" if isinstance(r["params"][k], float) else str(r["params"][k])
            for k in keys
        ]
        rows.append([str(place), str(r["trial"]), r["status"], loss, ppl, *params])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for r in ranked:
        if r["status"] != "ok":
            print(f"trial {r['trial']} {r['status']}: {r.get('stop_reason') or r.get('error')}")


def run_sweep(
    trials: int,
    out: Path,
    params: list[Param],
    overrides: list[str],
    config_file: str | None = None,
    nproc: int = 1,
    seed: int = 0,
    max_loss: float | None = None,
) -> list[dict]:
    """Run the trials one after the other; returns their records ranked best first (see module doc)."""
    if trials < 1:
        raise ValueError(f"--trials={trials}: expected a value >= 1")
    if nproc < 1:
        raise ValueError(f"--nproc={nproc}: expected a value >= 1")
    base = load_config(config_file, overrides)  # bad base overrides fail before any trial starts
    stop = [f"train.max_loss={max_loss!r}"] if max_loss is not None else []
    if max_loss is None and base.train.max_loss is None:
        stop = ["train.max_loss=.inf"]  # stop on NaN/inf only
    rng = random.Random(seed)
    planned = []
    for i in range(trials):
        chosen = [f"{p.key}={p.sample(rng)}" for p in params]
        trial_dir = out / f"trial-{i:03d}"
        config = load_config(config_file, [*overrides, *chosen, *stop, f"train.out_dir={trial_dir}"])
        planned.append((i, chosen, trial_dir, config))

    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.jsonl"
    results_file.write_text("")
    records = []
    for i, chosen, trial_dir, config in planned:
        values = {p.key: _value(config, p.key) for p in params}
        trial_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        print(f"trial {i + 1}/{trials}: " + " ".join(chosen), flush=True)
        result = _run_in_process(config, trial_dir) if nproc == 1 else _run_torchrun(config, trial_dir, nproc)
        record = {"trial": i, "params": values, "overrides": chosen, **result}
        record["wall_s"] = time.perf_counter() - start
        records.append(record)
        with results_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        outcome = f"val_loss {record['val_loss']:.4f}" if "val_loss" in record else record.get("error", "")
        print(f"  -> {record['status']}: {outcome} ({record['wall_s']:.1f} s)", flush=True)

    ranked = rank_trials(records)
    _print_summary(ranked, [p.key for p in params])
    best = ranked[0]
    if best["status"] == "ok":
        best_config = load_config(
            config_file, [*overrides, *best["overrides"], f"train.out_dir={out / 'best'}"]
        )
        dump_config(best_config, out / "best.yaml")
        print(
            f"best: trial {best['trial']} (val_loss {best['val_loss']:.4f}); "
            f"rerun: python examples/train_mla.py --config {out / 'best.yaml'}"
        )
    else:
        print("no trial finished; no best.yaml written")
    return ranked


def main(argv: list[str] | None = None) -> list[dict] | None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=None, help="number of trials")
    parser.add_argument("--out", help="sweep folder (trial-NNN/, results.jsonl, best.yaml)")
    parser.add_argument("--param", action="append", default=[], help="KEY=SPEC, repeatable")
    parser.add_argument("--config", help="base YAML config")
    parser.add_argument("--nproc", type=int, default=1, help="ranks per trial (>1: torchrun subprocesses)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parameter draws")
    parser.add_argument(
        "--max-loss", type=float, default=None, help="stop a trial whose train loss exceeds this"
    )
    parser.add_argument("--run-trial", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides for every trial")
    args = parser.parse_args(argv)
    if args.run_trial:
        _run_trial_worker(args.run_trial, args.result)
        return None
    if args.trials is None or args.out is None or not args.param:
        parser.error("--trials, --out and at least one --param are required")
    try:
        params = [parse_param(p) for p in args.param]
        return run_sweep(
            args.trials,
            Path(args.out),
            params,
            args.overrides,
            args.config,
            args.nproc,
            args.seed,
            args.max_loss,
        )
    except ValueError as err:  # ConfigError is a ValueError
        fail(str(err).splitlines()[0] if str(err) else repr(err))
    return None


if __name__ == "__main__":
    main(sys.argv[1:])
