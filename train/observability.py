"""What a run shows of itself besides `metrics.jsonl`: trackers, the step-time breakdown, profiler traces.

One object the trainer builds once and hooks into its loop with a few calls: `trackers`
(train/trackers.py: wandb and TensorBoard, rank 0), `timer` (train/timing.py: per-phase step times in
every training record) and `profiler` (train/profiling.py: Chrome traces of `train.profile_steps`).
"""

from __future__ import annotations

from pathlib import Path

from train.checkpointing import Resumed
from train.config import Config, config_to_dict
from train.context import RunContext
from train.profiling import StepProfiler
from train.timing import StepTimer
from train.trackers import Trackers


class Observability:
    def __init__(
        self, config: Config, resolved: Config, context: RunContext, resumed: Resumed | None
    ) -> None:
        tc, out_dir = config.train, Path(config.train.out_dir)
        self.trackers = Trackers(
            tc.wandb,
            tc.tensorboard,
            out_dir,
            context.is_main,
            run_id=resumed.wandb_run_id if resumed else None,
            config=config_to_dict(resolved),
        )
        self.timer = StepTimer(tc.time_breakdown, context.device)
        self.profiler = StepProfiler(tc.profile_steps, out_dir, context.topology.rank, context.device)

    def close(self) -> None:
        """Write a profile cut short by the end of the run, and close the trackers."""
        self.profiler.close()
        self.trackers.close()
