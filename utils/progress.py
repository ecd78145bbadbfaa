"""How far a long phase is: ``k/n``, the time spent and an ETA, as log lines (terminal and the run's log file) and,
in an interactive terminal, a tqdm bar.

A line is logged when the phase ends and, in between, at most every ``every_s`` seconds, so that a short phase
costs one line and a long one says where it is at least twice a minute. While a bar is on screen the in-between
lines go to the log file only (the bar already shows them).
"""
from __future__ import annotations

import logging
import time
from typing import Iterable, Iterator, TypeVar

from utils.logger import progress_bar

T = TypeVar("T")
log = logging.getLogger("progress")
EVERY_S = 30.0


def duration(seconds: float) -> str:
    """``0.8s``, ``42s``, ``3m05s``, ``1h02m``."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def eta(elapsed: float, done: int, total: int) -> str:
    """Remaining time at the mean pace so far (``?`` before the first item)."""
    if done <= 0:
        return "?"
    return duration(elapsed / done * max(total - done, 0))


def status(what: str, done: int, total: int, elapsed: float) -> str:
    if done >= total:
        return f"{what}: {total}/{total} done in {duration(elapsed)}"
    return f"{what}: {done}/{total} ({100 * done / max(total, 1):.0f} %), {duration(elapsed)} elapsed, " \
           f"ETA {eta(elapsed, done, total)}"


class Meter:
    """Progress of a phase counted by hand (``update(done)``), e.g. images of a batched loop."""

    def __init__(self, what: str, total: int, *, every_s: float = EVERY_S, file_only: bool = False):
        self.what, self.total, self.every_s, self.file_only = what, max(int(total), 1), every_s, file_only
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, done: int) -> None:
        self.done = min(int(done), self.total)
        now = time.perf_counter()
        if self.done >= self.total or now - self.last >= self.every_s:
            self.last = now
            log.info(status(self.what, self.done, self.total, now - self.start),
                     extra={"file_only": self.file_only and self.done < self.total})

    def finish(self) -> None:
        """The closing line when the loop stopped before ``total`` (e.g. a cap reached)."""
        if self.done < self.total:
            log.info("%s: stopped at %d/%d after %s", self.what, self.done, self.total,
                     duration(time.perf_counter() - self.start))


def track(iterable: Iterable[T], what: str, *, total: int | None = None, bar: bool = True,
          every_s: float = EVERY_S) -> Iterator[T]:
    """Iterate ``iterable`` while reporting ``what: k/n``; ``bar``: also a tqdm bar in an interactive terminal."""
    total = len(iterable) if total is None else total  # type: ignore[arg-type]
    shown = progress_bar(iterable, enabled=bar, desc=what, total=total)
    meter = Meter(what, total, every_s=every_s, file_only=shown is not None)
    for done, item in enumerate(shown if shown is not None else iterable, start=1):
        yield item
        meter.update(done)
