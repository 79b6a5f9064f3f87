"""Progress output: a live bar on a terminal, plain lines in logs and CI."""

from __future__ import annotations

import sys
import time

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


class Progress:
    """Steps done, loss, tokens/s and ETA."""

    def __init__(self, total: int, *, enabled: bool = True, stream=None):
        self.total, self.enabled = total, enabled
        self.console = Console(file=stream or sys.stderr)
        self.live = enabled and self.console.is_terminal
        self._bar: RichProgress | None = None
        self._task = None
        self._t0 = 0.0
        self._first = 0
        # In plain mode print about 20 lines per run, and always the first and last step.
        self._every = max(1, total // 20)

    def start(self, step: int) -> None:
        self._t0, self._first = time.perf_counter(), step
        if not self.enabled:
            return
        if self.live:
            self._bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=self.total, completed=step, info="")

    def eta(self, step: int) -> float:
        done = step - self._first
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self._t0) / done * (self.total - step)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=_fmt(metrics))
        elif step % self._every == 0 or step == self.total or step == self._first + 1:
            eta = self.eta(step)
            self.console.print(
                f"step {step}/{self.total}  {_fmt(metrics)}  eta {eta:.0f}s", highlight=False
            )

    def note(self, text: str) -> None:
        """A message between the progress lines (run-health findings); printed above a live
        bar, which stays in place."""
        if self.enabled:
            self.console.print(text, highlight=False, markup=False)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
