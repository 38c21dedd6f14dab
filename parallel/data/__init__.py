"""Data parallelism: gradient buckets reduced over the data-parallel group while backward runs
(`DataParallel`), and the ZeRO-sharded optimizer (stages 0-3, CPU offload) built on the same buckets."""

from parallel.data.data_parallel import DataParallel
from parallel.data.zero import ZeroOptimizer

__all__ = ["DataParallel", "ZeroOptimizer"]
