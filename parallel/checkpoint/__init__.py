"""Sharded, atomic, checksummed checkpoints that load into any (dp, tp, pp, zero) layout: the file format
and its save/load (`format`), and the re-sharding of parameters and optimizer state (`reshard`)."""

from parallel.checkpoint.format import (
    LATEST,
    MANIFEST,
    STEP_DIR,
    find_latest,
    load,
    prune,
    read_full,
    read_manifest,
    save,
    step_name,
    verify,
)

__all__ = [
    "LATEST",
    "MANIFEST",
    "STEP_DIR",
    "find_latest",
    "load",
    "prune",
    "read_full",
    "read_manifest",
    "save",
    "step_name",
    "verify",
]
