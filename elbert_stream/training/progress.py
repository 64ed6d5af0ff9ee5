"""Training progress: steps done, rate and time left, for the bar and for log lines.

``RunProgress`` counts the optimizer steps of a run (a resumed run starts at its checkpoint's step;
its rate counts only the steps taken since it started) and says ``step 40/224 (17.9%), 0.25
steps/s, 4.0 texts/s, elapsed 2m40s, ETA 12m16s``; ``progress_bar()`` is the rich bar showing the
same numbers (rich, in the ``[train]`` extra, imported lazily).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def format_duration(seconds: float) -> str:
    """``3723`` -> ``1h02m03s``, ``160`` -> ``2m40s``, ``7.2`` -> ``7s``."""
    s = max(0, round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class RunProgress:
    """Steps ``done`` of ``total`` and the rate since this process started counting."""

    def __init__(self, total: int, done: int, batch_size: int,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.total, self.done, self.batch_size, self.clock = total, done, batch_size, clock
        self.start_step, self.start_s = done, clock()

    def advance(self, steps: int = 1) -> None:
        self.done += steps

    @property
    def elapsed_s(self) -> float:
        return self.clock() - self.start_s

    @property
    def steps_per_s(self) -> float | None:
        """Steps per second over the steps taken here; None before the first."""
        taken, elapsed = self.done - self.start_step, self.elapsed_s
        return taken / elapsed if taken > 0 and elapsed > 0 else None

    @property
    def eta_s(self) -> float | None:
        rate = self.steps_per_s
        return (self.total - self.done) / rate if rate else None

    def rate_text(self) -> str:
        """``0.25 steps/s, 4.0 texts/s`` (``- steps/s`` before the first step)."""
        rate = self.steps_per_s
        if rate is None:
            return "- steps/s"
        steps = f"{rate:.2f} steps/s" if rate >= 0.1 else f"{1 / rate:.1f} s/step"
        return f"{steps}, {rate * self.batch_size:.1f} texts/s"

    def summary(self) -> str:
        """One line for the log: step, percentage, rate, elapsed and ETA."""
        eta = self.eta_s
        return (f"step {self.done}/{self.total} ({100 * self.done / max(1, self.total):.1f}%), "
                f"{self.rate_text()}, elapsed {format_duration(self.elapsed_s)}, "
                f"ETA {'-' if eta is None else format_duration(eta)}")


def progress_bar() -> Any:
    """A rich progress bar: steps, rate (the task's ``rate`` field), elapsed, time left, loss."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    TextColumn("{task.description}"), transient=False)
