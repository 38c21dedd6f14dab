"""`train.profile_steps: [first, last]`: torch.profiler traces of those steps, one Chrome trace per rank.

The profiler starts before step `first` (1-based, as logged) and stops after step `last`; each rank
writes `out_dir/profile/rank-RRRRR.json` (open in chrome://tracing or https://ui.perfetto.dev). The
trace has named regions: `data`, `compute` with `forward` and `backward` inside (per micro-batch, or per
pipeline action), `optimizer` (clipping, the non-finite check, the update), `checkpoint`, and one region
per collective call named by its kind (`all_reduce`, `all_gather`, `reduce_scatter_tensor`, `broadcast`,
`barrier`, ... and `<kind>.wait` for the wait on an asynchronous one; train/timing.py). On CUDA it also
records the allocator's history and writes `memory-rank-RRRRR.pickle`, a memory snapshot for
https://pytorch.org/memory_viz.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


class StepProfiler:
    """Starts and stops torch.profiler around the configured steps of one rank."""

    def __init__(self, steps: list[int] | None, out_dir: Path, rank: int, device: torch.device) -> None:
        self.first, self.last = steps if steps else (None, None)
        self.folder, self.rank, self.device = out_dir / "profile", rank, device
        self._profile: profile | None = None

    def before_step(self, step: int) -> None:
        """Called before step `step` (1-based) runs."""
        if step != self.first:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self._profile = profile(activities=activities, record_shapes=False)
        self._profile.__enter__()

    def after_step(self, step: int) -> Path | None:
        """Called after step `step` (1-based); the trace's path when this step ended the window."""
        if self._profile is None or (step != self.last and step is not None):
            return None
        self._profile.__exit__(None, None, None)
        path = self.folder / f"rank-{self.rank:05d}.json"
        self._profile.export_chrome_trace(str(path))
        self._profile = None
        if self.device.type == "cuda":
            torch.cuda.memory._dump_snapshot(str(self.folder / f"memory-rank-{self.rank:05d}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        return path

    def close(self) -> None:
        """Write what was recorded when the run stops inside the window."""
        self.after_step(None)
