"""Which checkpoint a resumed run continues from, and keeping `checkpoints/` one line of history.

`train.resume=auto` follows `checkpoints/latest`, the last checkpoint the run that owns the folder
committed: that one if it is complete and matches its checksums, else the newest valid one older than it,
each skipped one with the reason. Checkpoints newer than `latest` belong to no lineage this run follows
(a save that died between its rename and the update of `latest`, or an abandoned future after a
rollback); they are never taken. Without `latest` (an older run), the newest valid checkpoint.

Resuming from step s (`auto` or a path, a rollback to an older checkpoint of the same folder included)
makes s the head of the folder's lineage: every checkpoint of `checkpoints/` newer than s is moved into
`checkpoints/superseded-<time>/` (never deleted; `auto` and pruning ignore it), and `latest` names s
when s lives in this folder. So after a rollback and a crash, `auto` continues the rolled-back-to line.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from parallel import checkpoint


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete-named checkpoint folders under `root`, newest first."""
    found = []
    for path in root.iterdir() if root.is_dir() else ():
        match = checkpoint.STEP_DIR.fullmatch(path.name)
        if match and not match[2] and path.is_dir():
            found.append((int(match[1]), path))
    return sorted(found, reverse=True)


def find_auto(root: Path) -> tuple[Path | None, list[str]]:
    """The checkpoint `train.resume=auto` takes under `root` (a `checkpoints/` folder), and notes on the
    ones passed over, saying why; (None, notes) when there is none."""
    latest = root / checkpoint.LATEST
    name = latest.read_text().strip() if latest.is_file() else ""
    match = checkpoint.STEP_DIR.fullmatch(name)
    if not match or match[2]:
        return checkpoint.find_latest(root)
    head, notes = int(match[1]), []
    for step, path in _step_dirs(root):
        if step > head:
            notes.append(f"ignoring checkpoint {path}: newer than {latest} ({name}), not of this run's line")
            continue
        reason = checkpoint.verify(path)
        if reason is None:
            return path, notes
        notes.append(f"skipping checkpoint {path}: {reason}")
    return None, notes


def make_head(root: Path, chosen: Path, step: int) -> list[str]:
    """Make `chosen` (step `step`) the head of `root`'s lineage (see the module docstring); returns what
    was done, one line each. Rank 0, before training."""
    later = [path for s, path in _step_dirs(root) if s > step]
    done = []
    if later:
        aside = root / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir(exist_ok=True)
        for path in later:
            os.replace(path, aside / path.name)
        done.append(f"moved {len(later)} checkpoint(s) after step {step} to {aside}: not of this run's line")
    if chosen.resolve().parent == root.resolve():
        tmp = root / (checkpoint.LATEST + ".tmp")
        tmp.write_text(chosen.name + "\n")
        os.replace(tmp, root / checkpoint.LATEST)
    return done


def manifest_step(path: Path) -> int:
    return int(checkpoint.read_manifest(path)["step"])
