"""A hang watchdog on every rank: names the rank and what it waits in when a phase outlives its timeout.

The trainer labels each phase of a step as it enters it (`phase("step 12: gradient clipping (norm all-reduce
over tp/pp)")`); a daemon thread checks every second (every 1/40 of the limit when that is shorter). When one
phase has lasted 85% of its limit (`distributed.startup_timeout_s` until the first step is done, then
`distributed.timeout_s`), the rank prints `error: [rank R] hung for N s in <phase>`, and at 95% ends its
process (unless the phase ended meanwhile), so torchrun stops the job and every rank's log says where it was:
the ranks waiting in a collective name that collective, and a rank stuck elsewhere names where. The collective
timeouts of the process groups (the same limits) remain the backstop; the watchdog fires before them, so that
its line is the one printed; the gap between reporting and exiting lets every rank print before the first exit
(reporting and exiting at once at 95%, with one-second polls, a collective or torchrun's stop came first under
an 8 s limit).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

REPORT_AT, EXIT_AT = 0.85, 0.95  # fractions of the limit: every rank reports before any rank exits


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _exit_now() -> None:
    os._exit(3)  # the main thread is blocked in the hang: only a hard exit ends it


class Watchdog:
    """`phase(label)` at each phase boundary; `limit(seconds)` to change the limit; `close()` at the end.

    A phase that lasts `REPORT_AT` of the limit is reported (`on_hang(message)`); if it still lasts at
    `EXIT_AT`, `on_exit()` ends the process. The gap lets every rank of a hung job print its line before
    the first exit makes torchrun stop the others."""

    def __init__(
        self,
        rank: int,
        seconds: float,
        on_hang: Callable[[str], None] = _print,
        on_exit: Callable[[], None] = _exit_now,
    ) -> None:
        self.rank, self.seconds, self.on_hang, self.on_exit = rank, seconds, on_hang, on_exit
        self.label, self.since = "start-up", time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"watchdog-rank{rank}", daemon=True)
        self._thread.start()

    def phase(self, label: str) -> None:
        self.label, self.since = label, time.monotonic()

    def limit(self, seconds: float) -> None:
        self.seconds = seconds

    def _watch(self) -> None:
        reported = None  # the `since` of the phase already reported
        while not self._stop.wait(min(1.0, self.seconds / 40)):
            since = self.since
            waited = time.monotonic() - since
            if waited > REPORT_AT * self.seconds and reported != since:
                reported = since
                self.on_hang(
                    f"error: [rank {self.rank}] hung for {waited:.0f} s in {self.label} (limit "
                    f"{self.seconds:g} s: distributed.timeout_s, or startup_timeout_s before the first step)"
                )
            if waited > EXIT_AT * self.seconds and reported == since:
                self.on_exit()
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
