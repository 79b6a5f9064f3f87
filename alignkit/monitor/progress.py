"""Progress output for every phase a user waits on: training steps, the reference log-prob pass,
evaluations, sample generations.

On a terminal each phase shows a live bar. Where the output is a file (CI, nohup, a cluster
job), a phase prints a line when it starts, about every 10% of its work or every 30 s, whichever
comes first, and when it ends, each with counts and an ETA, so a log never goes quiet for
minutes without saying why.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


def _fmt(metrics: dict[str, float]) -> str:
    parts = []
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}")
    if "eval/loss" in metrics:
        parts.append(f"eval {metrics['eval/loss']:.4f}")
    if "tokens_per_s" in metrics:
        parts.append(f"{metrics['tokens_per_s']:.0f} tok/s")
    return "  ".join(parts)


# The first line reads "1 batch", not "1 batches"; counts ("1/1 batches") keep the plural.
SINGULAR = {"batches": "batch", "steps": "step", "prompts": "prompt"}


def duration(seconds: float) -> str:
    """42s, 3m05s, 1h02m: short enough for a progress line."""
    if seconds != seconds:  # NaN: no rate yet
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Phases:
    """Where a run's progress goes and whether it shows at all (`train.progress`); makes the
    `Progress` of each phase. Phases running at once (an evaluation during training) share one
    live bar on a terminal, since a terminal holds one live display.

    `terminal` overrides the detection of a terminal; `clock` is injectable for tests.
    """

    def __init__(
        self,
        *,
        enabled: bool = True,
        stream=None,
        terminal: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        every_s: float = 30.0,
    ):
        self.enabled, self.clock, self.every_s = enabled, clock, every_s
        self.console = Console(file=stream or sys.stderr, force_terminal=terminal)
        self.live = enabled and self.console.is_terminal
        self._bar: RichProgress | None = None
        self._tasks = 0

    def __call__(
        self, label: str, total: int, unit: str = "batches", detail: str = "", lines: int = 10
    ) -> Progress:
        """A phase of `total` units; `detail` follows the count in its first line ("of 4")."""
        return Progress(total, label=label, unit=unit, detail=detail, lines=lines, phases=self)

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def add_task(self, label: str, total: int, done: int, unit: str):
        if self._bar is None:
            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[unit]}"),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._bar.start()
        self._tasks += 1
        return self._bar.add_task(label, total=total, completed=done, unit=unit, info="")

    def update_task(self, task, done: int, info: str) -> None:
        if self._bar is not None:
            self._bar.update(task, completed=done, info=info)

    def remove_task(self, task) -> None:
        if self._bar is None:
            return
        self._bar.remove_task(task)
        self._tasks -= 1
        if self._tasks == 0:
            self._bar.stop()
            self._bar = None


class Progress:
    """One phase: `total` units of work, its counts, rate and ETA.

    Use it as a context manager (or call `start` and `stop`) and report with `update(done)` or
    `advance()`. `lines` is about how many progress lines plain mode prints over the phase
    (besides its first and last, and one at least every `every_s` seconds).
    """

    def __init__(
        self,
        total: int,
        *,
        label: str = "train",
        unit: str = "steps",
        detail: str = "",
        lines: int = 20,
        enabled: bool = True,
        stream=None,
        phases: Phases | None = None,
    ):
        self.total, self.label, self.unit, self.detail = total, label, unit, detail
        self.lines = max(1, lines)
        self.phases = phases if phases is not None else Phases(enabled=enabled, stream=stream)
        self.enabled = self.phases.enabled
        self.done = self._first = 0
        self._t0 = self._last_line = 0.0
        self._task = None
        self._info = ""
        self._running = False

    # -- reporting ------------------------------------------------------------------------------
    def start(self, done: int = 0) -> Progress:
        """Begin at `done` units (a resumed run starts part way)."""
        clock = self.phases.clock
        self._t0 = self._last_line = clock()
        self.done = self._first = done
        self._running = True
        if not self.enabled:
            return self
        if self.phases.live:
            self._task = self.phases.add_task(self.label, self.total, done, self.unit)
        else:
            detail = f" {self.detail}" if self.detail else ""
            since = f", from {done}" if done else ""
            unit = SINGULAR.get(self.unit, self.unit) if self.total == 1 else self.unit
            self.phases.print(f"{self.label}: {self.total} {unit}{detail}{since}")
        return self

    def update(self, done: int, metrics: dict[str, float] | None = None) -> None:
        prev, self.done = self.done, done
        if metrics is not None:
            self._info = _fmt(metrics)
        if not self.enabled:
            return
        if self._task is not None:
            self.phases.update_task(self._task, done, self._info)
        elif self._line_due(prev, done):
            self._last_line = self.phases.clock()
            self.phases.print(self._line())

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n)

    def note(self, text: str) -> None:
        """A message between the progress lines (run-health findings); printed above a live
        bar, which stays in place."""
        self.phases.print(text)

    def stop(self) -> None:
        """End the phase with a line of its counts and elapsed time (once)."""
        if not self._running:
            return
        self._running = False
        if self._task is not None:
            self.phases.remove_task(self._task)
            self._task = None
        if self.enabled:
            self.phases.print(self._end_line())

    def __enter__(self) -> Progress:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the numbers ----------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.phases.clock() - self._t0

    def eta(self, done: int | None = None) -> float:
        done = self.done if done is None else done
        if done - self._first <= 0:
            return float("nan")
        return self.elapsed() / (done - self._first) * (self.total - done)

    def _line_due(self, prev: int, done: int) -> bool:
        if done >= self.total:
            return False  # the end line says it
        if done == self._first + 1:
            return True  # the first rate, for an early ETA
        return (
            self._marks(done) > self._marks(prev)
            or self.phases.clock() - self._last_line >= self.phases.every_s
        )

    def _marks(self, done: int) -> int:
        """How many of the phase's `lines` evenly spaced marks `done` has passed."""
        return done * self.lines // max(self.total, 1)

    def _line(self) -> str:
        info = f"  {self._info}" if self._info else ""
        return (
            f"{self.label}: {self.done}/{self.total} {self.unit}{info}  "
            f"{duration(self.elapsed())} elapsed, eta {duration(self.eta())}"
        )

    def _end_line(self) -> str:
        info = f"  {self._info}" if self._info else ""
        took = duration(self.elapsed())
        if self.done >= self.total:
            return f"{self.label}: {self.done}/{self.total} {self.unit} in {took}{info}"
        return f"{self.label}: stopped at {self.done}/{self.total} {self.unit} after {took}{info}"
