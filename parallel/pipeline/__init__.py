"""Pipeline parallelism: schedules as data with a pure-Python simulator (`schedules`), one executor for
any schedule (`executor`), and the deferred weight gradients of zero-bubble schedules (`deferred_wgrad`)."""

from parallel.pipeline.executor import PipelineExecutor
from parallel.pipeline.parts import ModelParts
from parallel.pipeline.schedules import SCHEDULES, Action, bubble_formula, build_schedule, simulate

__all__ = [
    "SCHEDULES",
    "Action",
    "ModelParts",
    "PipelineExecutor",
    "bubble_formula",
    "build_schedule",
    "simulate",
]
