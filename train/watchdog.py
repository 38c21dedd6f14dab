"""A hang watchdog on every rank: names the rank and what it waits in when a phase outlives its timeout.

The trainer labels each phase of a step as it enters it (`phase("step 12: gradient clipping (norm
all-reduce over tp/pp)")`); a daemon thread checks once a second. When one phase has lasted 95% of its
limit (`distributed.startup_timeout_s` until the first step is done, then `distributed.timeout_s`), the
rank prints `error: [rank R] hung for N s in <phase>` and ends its process, so torchrun stops the job
and every rank's log says where it was: the ranks waiting in a collective name that collective, and a
rank stuck elsewhere names where. The collective timeouts of the process groups (the same
limits) remain the backstop; the watchdog fires just before them, so that its line is the one printed.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable


def _exit_now(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os._exit(3)  # the main thread is blocked in the hang: only a hard exit ends it


class Watchdog:
    """`phase(label)` at each phase boundary; `limit(seconds)` to change the limit; `close()` at the end."""

    def __init__(self, rank: int, seconds: float, on_hang: Callable[[str], None] = _exit_now) -> None:
        self.rank, self.seconds, self.on_hang = rank, seconds, on_hang
        self.label, self.since = "start-up", time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"watchdog-rank{rank}", daemon=True)
        self._thread.start()

    def phase(self, label: str) -> None:
        self.label, self.since = label, time.monotonic()

    def limit(self, seconds: float) -> None:
        self.seconds = seconds

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.seconds / 4)):
            waited = time.monotonic() - self.since
            if waited > 0.95 * self.seconds:
                self.on_hang(
                    f"error: [rank {self.rank}] hung for {waited:.0f} s in {self.label} (limit "
                    f"{self.seconds:g} s: distributed.timeout_s, or startup_timeout_s before the first step)"
                )
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
