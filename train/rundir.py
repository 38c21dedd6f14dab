"""A run owns its `train.out_dir`: one lock, one run's files, checked before any expensive work.

`claim(out_dir, resume, overwrite)` runs on global rank 0 before the data is built:

- the folder must be a writable folder (or creatable): a file in its place, a read-only filesystem or a
  missing permission is a one-line error naming the path (`claim_for_run` checks `data.cache_dir` alike);
- `out_dir/.lock` is created exclusively (`O_CREAT | O_EXCL`) and holds this run's host, pid and torchrun
  job id. A second run on the same folder is refused with the holder's host and pid. A lock is stale, and
  taken over with a warning, when its process is gone (same host, pid not running) or when it belongs to
  an earlier attempt of this same torchrun job (same TORCHELASTIC_RUN_ID: a restart). The lock is removed
  when the run ends (`release`), whatever the outcome; a SIGKILLed run leaves a stale one;
- a folder that holds a run (`config.yaml`, `metrics.jsonl`, `checkpoints/` or `final/`) is only
  entered by a run that says what to do with it: `train.resume=auto` or a path continues it, and
  `train.overwrite=true` moves its files aside into the sibling folder `<out_dir>.replaced-<time>/`
  (nothing is deleted). Otherwise the run is refused and no file is touched;
- leftover `checkpoints/step-N.tmp/` folders of a save that died are removed (they hold no complete
  checkpoint; `train.resume` never reads them).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import torch.distributed as dist

from parallel.checkpoint import STEP_DIR
from train.config import Config
from train.context import RunContext

LOCK = ".lock"
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "final")


class RunDirError(ValueError):
    """`train.out_dir` cannot be used by this run (one line, naming the folder)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_record() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job": os.environ.get("TORCHELASTIC_RUN_ID"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _stale(holder: dict) -> str | None:
    """Why the lock of `holder` is stale, or None when its run may still be alive."""
    mine = _lock_record()
    if holder.get("job") and holder.get("job") == mine["job"]:
        return f"an earlier attempt of this torchrun job (pid {holder.get('pid')})"
    if holder.get("host") == mine["host"] and not _pid_alive(int(holder.get("pid", -1))):
        return f"pid {holder.get('pid')} on {holder.get('host')} is not running"
    return None


def check_folder(out_dir: Path, key: str = "train.out_dir") -> None:
    """`out_dir` is, or can be made, a writable folder; else a one-line `RunDirError` naming `key`."""
    text = f"{key}={str(out_dir)!r}"
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"{text}: is a file, expected a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunDirError(f"{text}: cannot create the folder ({error.strerror or error})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise RunDirError(f"{text}: the folder is not writable")


def _take_lock(out_dir: Path, warn) -> Path:
    lock = out_dir / LOCK
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            why = _stale(holder) if holder else "unreadable lock"
            if why is None:
                raise RunDirError(
                    f"train.out_dir={str(out_dir)!r} is in use by another run (host {holder.get('host')}, "
                    f"pid {holder.get('pid')}, since {holder.get('started')}); wait for it, use another "
                    f"out_dir, or delete {lock} if that run is gone"
                ) from None
            warn(f"taking over the stale lock {lock}: {why}")
            lock.unlink(missing_ok=True)
            continue
        except OSError as error:
            raise RunDirError(
                f"train.out_dir={str(out_dir)!r}: cannot write {LOCK} ({error.strerror or error})"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(_lock_record(), f)
        return lock
    raise RunDirError(f"train.out_dir={str(out_dir)!r}: another run took the lock {lock} at the same time")


def _move_aside(out_dir: Path, held: list[str]) -> Path:
    aside = out_dir.with_name(f"{out_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        aside.mkdir()
        for name in held:
            os.replace(out_dir / name, aside / name)
    except OSError as error:
        raise RunDirError(
            f"train.overwrite=true: cannot move the previous run to {aside} ({error})"
        ) from None
    return aside


def _clean_tmp(out_dir: Path, warn) -> None:
    root = out_dir / "checkpoints"
    for path in root.iterdir() if root.is_dir() else ():
        match = STEP_DIR.fullmatch(path.name)
        if match and match[2] and path.is_dir():
            warn(f"removing {path}: a save that did not finish (no complete checkpoint in it)")
            shutil.rmtree(path, ignore_errors=True)


def claim(out_dir: str | Path, resume: str, overwrite: bool, warn, log) -> Path:
    """Check, lock and prepare `out_dir` for this run (see the module docstring); returns the lock file.
    Raises `RunDirError` (one line) with nothing touched but the new lock, which is then removed."""
    if not str(out_dir).strip():
        raise RunDirError(
            f"train.out_dir={str(out_dir)!r}: expected a folder for the run's files (not empty)"
        )
    out_dir = Path(out_dir)
    check_folder(out_dir)
    lock = _take_lock(out_dir, warn)
    try:
        held = sorted(name for name in RUN_FILES if (out_dir / name).exists())
        if held and resume == "never":
            if not overwrite:
                raise RunDirError(
                    f"train.out_dir={str(out_dir)!r} holds a run ({', '.join(held)}) and train.resume=never: "
                    f"set train.resume=auto to continue it, or train.overwrite=true to move it aside"
                )
            log(f"train.overwrite=true: moved the previous run's files to {_move_aside(out_dir, held)}")
        _clean_tmp(out_dir, warn)
    except BaseException:
        release(lock)
        raise
    return lock


def release(lock: Path | None) -> None:
    """Remove this run's lock (only if it is still ours)."""
    if lock is None:
        return
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)


def claim_for_run(config: Config, context: RunContext) -> Path | None:
    """`claim` on global rank 0 (`data.cache_dir` checked first), its outcome told to every rank (all
    raise the same `RunDirError`); returns the lock on rank 0, None elsewhere."""
    tc, lock, error = config.train, None, None
    if context.is_main:
        try:
            warn = lambda message: print(f"warning: {message}", file=sys.stderr, flush=True)  # noqa: E731
            check_folder(Path(config.data.cache_dir), "data.cache_dir")
            lock = claim(tc.out_dir, tc.resume, tc.overwrite, warn, context.log)
        except RunDirError as caught:
            error = str(caught)
    if context.topology.is_distributed:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise RunDirError(error)
    return lock
