"""The records of a run: `metrics.jsonl` in `train.out_dir`, the same records kept in memory for the
summary, and the peak the MFU is measured against.

`metrics.jsonl` holds one strict-JSON object per line: a training record per logged step (`step`,
`loss`, `lr`, `grad_norm`, `tokens_per_s`, ...) and a validation record (`"split": "val"`) per
evaluation. A non-finite number is written as null. Only global rank 0 writes; a resumed run keeps the
records up to its step (train/checkpointing.py `restart_metrics`) and appends after them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from train.checkpointing import Resumed, restart_metrics
from train.gpus import detect_gpu


class MetricsLog:
    """Appends records to `metrics.jsonl` (rank 0) and keeps them as `history` and `val_history`."""

    def __init__(
        self,
        path: Path,
        is_main: bool,
        resumed: Resumed | None,
        on_record: Callable[[dict], None] | None = None,
    ) -> None:
        self.path, self.is_main, self.on_record = path, is_main, on_record  # on_record: the trackers
        self.history, self.val_history = restart_metrics(path, resumed, is_main)

    def add(self, entry: dict) -> None:
        if self.is_main:
            finite = {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in entry.items()
            }
            with self.path.open("a") as f:
                f.write(json.dumps(finite) + "\n")
            if self.on_record is not None:
                self.on_record(entry)
        (self.val_history if entry.get("split") == "val" else self.history).append(entry)


def peak_tflops(configured: float | None, device: torch.device) -> float | None:
    """The MFU denominator: `train.peak_tflops` if set, else the detected GPU preset's 16-bit dense peak
    (None on CPU or an unknown GPU: no MFU is reported)."""
    if (
        configured is None
        and device.type == "cuda"
        and (gpu := detect_gpu(torch.cuda.get_device_name(device)))
    ):
        return gpu.peak_tflops
    return configured


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
