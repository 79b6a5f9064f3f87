"""What a run-health rule sees, and the statistics it judges windows with.

A rule reads a `View`: every metric's history as a `Series` of (step, value), the observation being
judged and the run's shape. It answers with a `Check`. The helpers here compare windows of logged
values (means, standard errors, Welch's t) and pick the evaluations a trend is judged on; all are
plain Python on floats, O(window) per call.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass
class Series:
    """One metric's logged values in order, with the step of each."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, step: int, value: float) -> None:
        self.steps.append(step)
        self.values.append(value)

    def __len__(self) -> int:
        return len(self.values)

    def head(self, n: int) -> list[float]:
        return self.values[:n]

    def tail(self, n: int, upto: int | None = None) -> list[float]:
        """The last n values, or the last n logged at steps <= upto."""
        end = len(self.values) if upto is None else bisect.bisect_right(self.steps, upto)
        return self.values[max(0, end - n) : end]


@dataclass
class View:
    """What a rule sees: the history so far, the latest observation and the run's shape."""

    series: dict[str, Series]
    current: dict[str, float]  # the observation being judged
    step: int
    total_steps: int
    window: int  # logged values per smoothing window
    method: str
    settings: dict

    @property
    def progress(self) -> float:
        return self.step / max(self.total_steps, 1)

    def get(self, names: tuple[str, ...]) -> Series | None:
        """The first of `names` (alternative spellings of one metric) that has values."""
        return next((self.series[n] for n in names if n in self.series), None)


class Check(NamedTuple):
    judged: bool  # False: too little data to say yet
    message: str | None = None  # set when the failure shows
    pending: str | None = None  # why it cannot judge yet, when that is not just a short history


WAIT, OK = Check(False), Check(True)


def fire(message: str) -> Check:
    return Check(True, message)


# -- statistics over windows -------------------------------------------------------------------
def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def median(xs: list[float]) -> float:
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])


def stderr(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def shift_t(early: list[float], late: list[float]) -> float:
    """Welch's t statistic of mean(late) - mean(early): how many standard errors it moved."""
    diff = mean(late) - mean(early)
    se = math.sqrt(stderr(early) ** 2 + stderr(late) ** 2)
    if se < 1e-12:  # noiseless windows: any real change is significant
        return 0.0 if abs(diff) < 1e-12 else math.copysign(math.inf, diff)
    return diff / se


def trend_window(v: View, n: int) -> int:
    """Values per window when comparing the start of a series of n values with its end: a
    quarter of them, so a slow trend is not lost in the noise of a few batches, but at least the
    smoothing window and at most 50 values, so a check stays O(window)."""
    return max(v.window, min(50, n // 4))


def after_start(s: Series | None) -> list[float]:
    """The values of an eval series logged after training began (step 0 is the baseline)."""
    if s is None:
        return []
    return [x for st, x in zip(s.steps, s.values, strict=True) if st > 0]


def held_out_late(v: View, s: Series | None) -> Series | None:
    """An eval series to judge a trend on: one with a baseline before half-way (usually the
    evaluation at step 0) and an evaluation since half-way. None: judge the train split."""
    if s is None or len(s) < 2 or s.steps[0] >= 0.5 * v.total_steps:
        return None
    return s if s.steps[-1] >= 0.5 * v.total_steps else Series()


def resolved(early: list[float], late: list[float], floor: float) -> bool:
    """Whether two windows can resolve a change: the standard error of their difference is under
    a quarter of the level they reach (or of `floor`). Otherwise the noise of a few pairs per
    batch swamps a slow run's whole progress, and no verdict either way is warranted."""
    se = math.sqrt(stderr(early) ** 2 + stderr(late) ** 2)
    return se < 0.25 * max(abs(mean(early)), abs(mean(late)), floor)
