"""Asynchronous checkpoint saves: the training step waits only for the copy of its state to host memory.

`save_async(...)` runs `prepare_save` on the calling thread (collective: host copies of this rank's
tensors and RNG states) and then `SaveJob.write` (serialisation, SHA-256 sums, the files, the manifest and
the atomic rename) in a background thread. The write's two barriers run on a process group of their own
(`new_save_group`, gloo, made once by every rank), because one group's collectives must not be issued
from two threads at once. The files and the commit are those of the synchronous `save`, byte for byte.

`PendingSave.wait()` joins the thread and re-raises its error; a second save must wait for the first
(the caller's rule). A crash during the background write leaves `step-N.tmp/` without a manifest, which
`find_latest` skips: the previous checkpoint stays the newest valid one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from parallel.checkpoint.format import prepare_save
from parallel.topology import Topology


def new_save_group(topology: Topology):
    """A gloo group of the whole world for background writers (None in a single process). Collective."""
    return dist.new_group(backend="gloo") if topology.is_distributed else None


class PendingSave:
    """A checkpoint being written by a background thread."""

    def __init__(self, target: Callable[[], Path]) -> None:
        self.path: Path | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.path = target()
            except BaseException as error:  # re-raised by wait() on the training thread
                self.error = error

        self._thread = threading.Thread(target=run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> Path:
        """Block until the checkpoint is committed; returns its folder, or raises the writer's error."""
        self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"background checkpoint save failed: {self.error}") from self.error
        return self.path


def save_async(
    directory: str | Path,
    model: nn.Module | Sequence[nn.Module] | Mapping[int, nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    topology: Topology | None = None,
    group=None,
    step: int = 0,
    tokens: int = 0,
    config: dict | None = None,
    state: dict | None = None,
    rank_state: dict | None = None,
    on_written: Callable[[], None] | None = None,
    after: Callable[[Path], None] | None = None,
) -> PendingSave:
    """`save`, returning once the state is on the host; `after(path)` runs in the writer once committed.

    Collective. Under several processes `group` must come from `new_save_group`."""
    job = prepare_save(
        directory, model, optimizer, topology=topology, step=step, tokens=tokens, config=config, state=state
    )
    if job.topology.is_distributed and group is None:
        raise ValueError("save_async: group=None under several processes; pass new_save_group(topology)")

    def barrier() -> None:
        if group is not None:
            dist.barrier(group=group)

    def write() -> Path:
        path = job.write(rank_state=rank_state, on_written=on_written, barrier=barrier)
        if after is not None:
            after(path)
        return path

    return PendingSave(write)
