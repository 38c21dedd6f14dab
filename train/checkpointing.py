"""Checkpoints in the training loop: what to resume from, when to save, and the run state around them.

Checkpoints go to `train.out_dir/checkpoints/step-NNNNNNNN/` (parallel/checkpoint.py: sharded, atomic,
loadable under any layout) every `train.save_every` steps, at the end of the run, and when SIGTERM stops
it; the newest `train.keep_last` are kept. With `train.async_save` the step waits only for the copy of the
state to host memory; a thread writes the files and commits (parallel/checkpoint/background.py), the
next save waits for it, and so does the end of the run.

Besides the model and optimizer a checkpoint holds the step (which fixes the LR schedule and the data:
the batch of step k depends only on (seed, k)), the tokens consumed, the fp16 loss scaler, the
non-finite steps skipped, each rank's running loss since the last log record, the RNG states of every
rank, the resolved config and the wandb run id (train/trackers.py).

`train.resume`: `never`; `auto`, the checkpoint `checkpoints/latest` names, or the newest valid one older
than it (incomplete or corrupted ones are skipped with a warning saying why; none: start afresh; see
train/lineage.py); or a path: a checkpoint folder, or a run's `out_dir` or `checkpoints/` folder (its
newest valid checkpoint), an error when it holds none. A checkpoint past `train.steps` is refused. The
checkpoint taken becomes the head of the folder's lineage: newer ones are moved to a side folder. Global
rank 0 chooses and tells the others.

In the same layout a resumed run continues bit for bit: same weights, optimizer state, RNG, logging
window. In another layout the weights and optimizer state are re-cut exactly (8-bit moments
re-quantized in the new blocks), the logging window restarts at the resumed step, and the loss curve
continues within floating-point summation order of the uninterrupted run. `metrics.jsonl` keeps the
records up to the resumed step and continues after them.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from parallel import checkpoint
from parallel.lowbit.loss_scaler import DynamicLossScaler
from parallel.pipeline import ModelParts
from train.config import Config, ConfigError, config_to_dict
from train.context import RunContext
from train.faults import FaultPlan
from train.lineage import find_auto, make_head, manifest_step
from train.progress import Progress


@dataclass
class Resumed:
    """Where a resumed run continues from."""

    path: Path
    step: int
    tokens: int
    last_log_step: int
    loss_sum: float | None  # this rank's loss sum since last_log_step (same layout only)
    skipped: list[int]
    wandb_run_id: str | None = None  # the tracked run to continue (train/trackers.py)


def _warn(context: RunContext, message: str) -> None:
    if context.is_main:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _broadcast(context: RunContext, value):
    if context.topology.is_distributed:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def choose_checkpoint(resume: str, root: Path) -> tuple[Path | None, list[str], str | None]:
    """(checkpoint, notes on skipped ones, error) for `train.resume` = `auto` (the newest valid one under
    `root`) or a path (see the module docstring)."""
    if resume == "auto":
        found, notes = find_auto(root)  # follows `latest` (train/lineage.py)
        return found, notes, None
    path = Path(resume)
    if (path / checkpoint.MANIFEST).exists() or checkpoint.STEP_DIR.fullmatch(path.name):
        reason = checkpoint.verify(path)
        return (None, [], f"{path}: {reason}") if reason else (path, [], None)
    found, notes = checkpoint.find_latest(path / "checkpoints" if (path / "checkpoints").is_dir() else path)
    return (found, notes, None) if found else (None, notes, f"{path}: no valid checkpoint found")


class Checkpointer:
    """Saves and resumes the training state of one run (model parts, optimizer, loss scaler)."""

    def __init__(
        self,
        config: Config,
        resolved: Config,
        context: RunContext,
        parts: ModelParts,
        optimizer: torch.optim.Optimizer,
        scaler: DynamicLossScaler | None,
        faults: FaultPlan | None = None,
    ) -> None:
        self.config, self.resolved, self.context = config, resolved, context
        self.parts, self.optimizer, self.scaler = parts, optimizer, scaler
        self.faults = faults
        self.root = Path(config.train.out_dir) / "checkpoints"
        self.last_saved: int | None = None
        self.pending: checkpoint.PendingSave | None = None  # train.async_save: the save being written
        self.group = checkpoint.new_save_group(context.topology) if config.train.async_save else None
        self.tokenizer_sha256: str | None = None  # saved, and checked on resume, when the trainer sets it

    def resume(self) -> Resumed | None:
        """Load the checkpoint `train.resume` asks for into the model, optimizer and scaler (None: fresh)."""
        resume, context = self.config.train.resume, self.context
        if resume == "never":
            return None
        choice = self._choose() if context.is_main else None
        path, notes, error = _broadcast(context, choice)
        for note in notes:
            _warn(context, note)
        if error:
            raise ConfigError(f"train.resume={resume!r}: {error}")
        if path is None:
            context.log(f"resume: no checkpoint in {self.root}, starting from step 0")
            return None
        progress = Progress(f"loading {path}", 1, "tensors", enabled=context.is_main)
        info = checkpoint.load(
            path, self.parts, self.optimizer, topology=context.topology, progress=progress.track
        )
        progress.close()
        if context.is_main:  # loaded: it becomes the head of this folder's lineage (train/lineage.py)
            for line in make_head(self.root, Path(path), info["step"]):
                context.log(line)
        state = info["state"] or {}
        if self.scaler is not None and state.get("loss_scaler"):
            self.scaler.load_state_dict(state["loss_scaler"])
        saved = info["layout"]
        context.log(
            f"resumed from {path} (step {info['step']}, {info['tokens']:,} tokens; saved under "
            f"dp={saved['dp']} cp={saved.get('cp', 1)} ep={saved.get('ep', 1)} tp={saved['tp']} "
            f"pp={saved['pp']} zero_stage={saved['zero_stage']}; "
            + ("same layout: RNG states restored)" if info["same_layout"] else "another layout: re-sharded)")
        )
        rank_state = info["rank_state"]
        self.last_saved = info["step"]
        return Resumed(
            path=Path(path),
            step=info["step"],
            tokens=info["tokens"],
            last_log_step=state.get("last_log_step", info["step"]) if rank_state else info["step"],
            loss_sum=rank_state["loss_sum"] if rank_state else None,
            skipped=list(state.get("skipped_nonfinite", [])),
            wandb_run_id=state.get("wandb_run_id"),
        )

    def _choose(self) -> tuple[Path | None, list[str], str | None]:
        """`choose_checkpoint`, refused when the checkpoint is past `train.steps` or was trained with
        another tokenizer. Rank 0."""
        path, notes, error = choose_checkpoint(self.config.train.resume, self.root)
        if path is None or error:
            return path, notes, error
        step, steps = manifest_step(path), self.config.train.steps
        if step > steps:
            return None, notes, f"{path} is at step {step}, past train.steps={steps} (raise train.steps)"
        saved = (checkpoint.read_manifest(path).get("state") or {}).get("tokenizer_sha256")
        if saved and self.tokenizer_sha256 and saved != self.tokenizer_sha256:
            return (
                None,
                notes,
                (
                    f"{path} was trained with another tokenizer (sha256 {saved[:12]}..., this run's "
                    f"{self.tokenizer_sha256[:12]}...): its token ids mean other text"
                ),
            )
        return path, notes, None

    def due(self, step: int) -> bool:
        every = self.config.train.save_every
        return bool(every) and step % every == 0

    def save(
        self,
        step: int,
        tokens: int,
        loss_sum: torch.Tensor,
        last_log_step: int,
        skipped: list[int],
        wandb_run_id: str | None = None,
    ) -> None:
        """Write the checkpoint of `step` (completed steps) and prune old ones. Collective. With
        `train.async_save` it returns once the state is in host memory (after waiting for the previous
        save); `wait()` waits for the write."""
        context = self.context
        state = {"last_log_step": last_log_step, "skipped_nonfinite": skipped}
        if self.tokenizer_sha256:
            state["tokenizer_sha256"] = self.tokenizer_sha256
        if self.scaler is not None:
            state["loss_scaler"] = self.scaler.state_dict()
        if wandb_run_id is not None:
            state["wandb_run_id"] = wandb_run_id
        arguments = {
            "topology": context.topology,
            "step": step,
            "tokens": tokens,
            "config": config_to_dict(self.resolved),
            "state": state,
            "rank_state": {"loss_sum": loss_sum.item()},
            "on_written": None if self.faults is None else self.faults.on_written(step),
        }
        directory = self.root / checkpoint.step_name(step)
        self.last_saved = step
        if not self.config.train.async_save:
            self._committed(checkpoint.save(directory, self.parts, self.optimizer, **arguments))
            return
        self.wait()
        self.pending = checkpoint.save_async(
            directory, self.parts, self.optimizer, group=self.group, after=self._committed, **arguments
        )

    def _committed(self, path: Path) -> None:
        if self.context.is_main:
            checkpoint.prune(self.root, self.config.train.keep_last)
        self.context.log(f"saved checkpoint {path}")

    def wait(self) -> None:
        """Wait for a background save to be committed (raises its error). Not collective."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.wait()


def restart_metrics(path: Path, resumed: Resumed | None, is_main: bool) -> tuple[list[dict], list[dict]]:
    """Start `metrics.jsonl`: empty for a fresh run; for a resumed one, its records up to the resumed step
    (rewritten by rank 0). Returns the kept (training, validation) records."""
    lines = []
    if resumed is not None and path.exists():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        lines = [line for line in lines if json.loads(line)["step"] <= resumed.step]
    if is_main:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, path)
    records = [json.loads(line) for line in lines]
    return [r for r in records if "split" not in r], [r for r in records if r.get("split") == "val"]
