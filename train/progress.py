"""A live progress line for the long work that is not training: tokenizing a corpus, loading a large
checkpoint, exporting one.

`Progress(label, total, unit)` prints `label: 42% (12.3/29.0 MiB), 8 s, about 11 s left` to stderr at
most every `every_s` seconds, and once more when done; on a terminal the line is rewritten in place
(`\\r`), in a log file each update is its own line. Only the process that creates it with `enabled=True`
prints (the trainer passes `is_main`: global rank 0, or the one data builder of a node). Work shorter
than `every_s` prints nothing at all.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(
        self,
        label: str,
        total: float,
        unit: str = "",
        *,
        scale: float = 1.0,
        enabled: bool = True,
        every_s: float = 2.0,
        stream: TextIO | None = None,
    ) -> None:
        self.label, self.total, self.unit, self.scale = label, total, unit, scale
        self.enabled, self.every_s = enabled and total > 0, every_s
        self.stream = stream or sys.stderr
        self.done, self.start = 0.0, time.perf_counter()
        self.last_print, self.printed = self.start, False

    def _line(self, now: float) -> str:
        elapsed = now - self.start
        fraction = min(self.done / self.total, 1.0)
        text = (
            f"{self.label}: {fraction:.0%} ({self.done / self.scale:.4g}/{self.total / self.scale:.4g}"
            f"{' ' + self.unit if self.unit else ''}), {elapsed:.0f} s"
        )
        if 0 < fraction < 1:
            text += f", about {elapsed * (1 - fraction) / fraction:.0f} s left"
        return text

    def _print(self, now: float, final: bool = False) -> None:
        live = self.stream.isatty()
        end = "\n" if final or not live else ""
        self.stream.write(("\r" if live else "") + self._line(now) + end)
        self.stream.flush()
        self.last_print, self.printed = now, True

    def update(self, amount: float = 1.0) -> None:
        """`amount` more units done."""
        self.set(self.done + amount)

    def set(self, done: float) -> None:
        """`done` units done in all."""
        self.done = done
        now = time.perf_counter()
        if self.enabled and now - self.last_print >= self.every_s:
            self._print(now)

    def track(self, done: float, total: float) -> None:
        """A `progress(done, total)` callback (the total may be learnt only once the work starts)."""
        self.total = total
        self.set(done)

    def close(self) -> None:
        """The last line (only if an earlier one was printed)."""
        if self.enabled and self.printed:
            self._print(time.perf_counter(), final=True)
            self.enabled = False
