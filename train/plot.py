"""Training curves as PNG files: `python -m train.plot RUN_DIR [RUN_DIR ...] [--out DIR] [--tensorboard]`.

Reads each run's `metrics.jsonl` and writes, into the first RUN_DIR unless `--out` is given:

    loss.png        training loss (lines) and validation loss (dashed, dots), against the step
    lr.png          learning rate
    throughput.png  tokens per second
    seq_len.png     training sequence length (only when a run used the sequence-length curriculum)

with every run overlaid in its own colour, labelled by its folder name. A RUN_DIR without a
`metrics.jsonl` whose sub-folders have one (a sweep folder) stands for all of them.

matplotlib is an optional extra (`pip install 'mla-parallel[plot]'`); without it the command fails with
a one-line message saying so. `--tensorboard` also writes each run's records as TensorBoard scalars into
RUN_DIR/tensorboard/ (`tensorboard --logdir RUN_DIR/tensorboard`); it needs the `tensorboard` package.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from train.context import fail

MISSING_MATPLOTLIB = (
    "train.plot needs matplotlib: pip install 'mla-parallel[plot]' (or: pip install matplotlib)"
)
MISSING_TENSORBOARD = "--tensorboard needs the tensorboard package: pip install tensorboard"
TRAIN_SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "seq_len")


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) of a run, each in file order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir}: no metrics.jsonl (expected a run folder written by the trainer)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if "split" not in r and "loss" in r]
    val = [r for r in records if r.get("split") == "val"]
    return train, val


def expand_runs(paths: list[str | Path]) -> list[Path]:
    """The run folders named, a sweep folder standing for its sub-folders that hold a metrics.jsonl."""
    runs = []
    for path in map(Path, paths):
        if (path / "metrics.jsonl").is_file():
            runs.append(path)
            continue
        children = sorted(p.parent for p in path.glob("*/metrics.jsonl")) if path.is_dir() else []
        if not children:
            raise ValueError(f"{path}: no metrics.jsonl here or in its sub-folders")
        runs += children
    return runs


def _labels(runs: list[Path]) -> list[str]:
    names = [r.name for r in runs]
    return names if len(set(names)) == len(names) else [str(r) for r in runs]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(MISSING_MATPLOTLIB) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_runs(runs: list[Path], out_dir: Path) -> list[Path]:
    """Write the PNG files described in the module docstring; returns their paths."""
    plt = _pyplot()
    data = [read_metrics(run) for run in runs]
    labels = _labels(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []

    def figure(name: str, ylabel: str, key: str, *, log_y: bool = False, with_val: bool = False) -> None:
        if not any(key in r for train, _ in data for r in train):
            return
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, ((train, val), label) in enumerate(zip(data, labels, strict=True)):
            colour = colours[i % len(colours)]
            points = [(r["step"], r[key]) for r in train if key in r]
            if points:
                ax.plot(
                    *zip(*points, strict=True), color=colour, label=f"{label} train" if with_val else label
                )
            if with_val and val:
                steps, losses = zip(*[(r["step"], r["loss"]) for r in val], strict=True)
                ax.plot(steps, losses, "o--", color=colour, markersize=3, label=f"{label} val")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    figure("loss", "loss (nats per token)", "loss", with_val=True)
    figure("lr", "learning rate", "lr")
    figure("throughput", "tokens per second", "tokens_per_s")
    figure("seq_len", "training sequence length", "seq_len")
    return written


def export_tensorboard(run: Path) -> Path:
    """Write a run's records as TensorBoard scalars into RUN/tensorboard/; returns that folder."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError(MISSING_TENSORBOARD) from None
    train, val = read_metrics(run)
    logdir = Path(run) / "tensorboard"
    writer = SummaryWriter(str(logdir))
    for r in train:
        for key in TRAIN_SCALARS:
            if key in r:
                writer.add_scalar(f"train/{key}", r[key], r["step"])
    for r in val:
        writer.add_scalar("val/loss", r["loss"], r["step"])
        writer.add_scalar("val/perplexity", r["perplexity"], r["step"])
    writer.close()
    return logdir


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="run folders (each with a metrics.jsonl), or sweep folders")
    parser.add_argument("--out", help="where to write the PNG files (default: the first run folder)")
    parser.add_argument("--tensorboard", action="store_true", help="also export TensorBoard scalars per run")
    args = parser.parse_args(argv)
    try:
        runs = expand_runs(args.runs)
        if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ImportError(MISSING_TENSORBOARD)
        written = plot_runs(runs, Path(args.out or args.runs[0]))
        for run in runs if args.tensorboard else []:
            written.append(export_tensorboard(run))
    except (ImportError, ValueError) as err:
        fail(str(err))
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
