"""Sharded, atomic, checksummed checkpoints that load into any (dp, tp, pp, zero) layout: the file format
and its save/load (`format`); saves written by a background thread (`background`); tensors named as
slices of global ones (`slices`); what each rank writes (`collect`) and how any layout reads it back,
re-sharded (`reshard`)."""

from parallel.checkpoint.background import PendingSave, new_save_group, save_async
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
    "PendingSave",
    "find_latest",
    "load",
    "prune",
    "read_full",
    "read_manifest",
    "new_save_group",
    "save",
    "save_async",
    "step_name",
    "verify",
]
