"""Experiment trackers: every `metrics.jsonl` record also goes to Weights & Biases and/or TensorBoard.

Only global rank 0 tracks, and the packages are imported only when their key is set (`pip install
mla-parallel[wandb]`, `[tensorboard]`). A record's numbers are logged at its `step` under
`train/<field>` (training records) or `val/<field>` (validation records, `"split": "val"`); strings and
nulls are left out.

- `train.wandb: {project, name, entity, mode}`: `wandb.init(dir=out_dir, resume="allow")`, mode
  `online`, `offline` (run folder under `out_dir/wandb/`, `wandb sync` uploads it) or `disabled`. The
  run id is saved in every checkpoint (`state["wandb_run_id"]`) and passed back to `wandb.init` on
  resume, so a resumed run continues the same charts. The `WANDB_*` environment variables work as usual.
- `train.tensorboard: true`: event files under `out_dir/tensorboard/` (`tensorboard --logdir ...`).

A tracker that fails to start (package missing, no network, bad credentials) costs one warning line and
the run goes on without it.
"""

from __future__ import annotations

import math
import secrets
import sys
from collections.abc import Callable
from pathlib import Path


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def scalars(entry: dict) -> tuple[int, dict[str, float]]:
    """(step, {tag: value}) of one metrics record: its numbers, under `train/` or `val/`."""
    prefix = "val/" if entry.get("split") == "val" else "train/"
    values = {
        prefix + key: float(value)
        for key, value in entry.items()
        if key not in ("step", "split") and isinstance(value, (int, float))
    }
    return int(entry["step"]), values


class Trackers:
    """The run's trackers on rank 0 (nothing elsewhere, or when none is configured)."""

    def __init__(
        self,
        wandb: dict[str, str] | None,
        tensorboard: bool,
        out_dir: Path,
        is_main: bool,
        run_id: str | None = None,
        config: dict | None = None,
        warn: Callable[[str], None] = _warn,
    ) -> None:
        self.wandb_run = self.writer = None
        if not is_main:
            return
        if wandb is not None:
            start = lambda: self._start_wandb(wandb, out_dir, run_id, config)  # noqa: E731
            self.wandb_run = self._start("wandb", start, warn)
        if tensorboard:
            self.writer = self._start("tensorboard", lambda: self._start_tensorboard(out_dir), warn)

    @staticmethod
    def _start(name: str, start: Callable, warn: Callable[[str], None]):
        try:
            return start()
        except Exception as error:  # a tracker is never worth a crashed run
            message = " ".join(str(error).split())[:200]
            hint = f"; pip install 'mla-parallel[{name}]'" if isinstance(error, ImportError) else ""
            warn(f"{name} tracking is off: could not start it ({type(error).__name__}: {message}){hint}")
            return None

    @staticmethod
    def _start_wandb(settings: dict[str, str], out_dir: Path, run_id: str | None, config: dict | None):
        import wandb

        out_dir.mkdir(parents=True, exist_ok=True)
        return wandb.init(
            project=settings.get("project"),
            name=settings.get("name"),
            entity=settings.get("entity"),
            mode=settings.get("mode"),  # unset: WANDB_MODE, else online
            dir=str(out_dir),
            id=run_id or secrets.token_hex(4),
            resume="allow",
            config=config,
        )

    @staticmethod
    def _start_tensorboard(out_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    @property
    def run_id(self) -> str | None:
        """The wandb run id, kept in checkpoints (None without wandb)."""
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, entry: dict) -> None:
        if self.wandb_run is None and self.writer is None:
            return
        step, values = scalars(entry)
        values = {tag: v for tag, v in values.items() if math.isfinite(v)}
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
