"""MetricSums: names ending in /min and /max reduce by minimum and maximum, others average."""

from __future__ import annotations

import pytest
import torch

from alignkit.train.loop import MetricSums
from alignkit.train.method import StepOutput


class OneProcess:
    """The two collectives MetricSums uses, for a single process."""

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def gather(self, tensor):
        return tensor


class TwoProcesses:
    """Collectives with a second process holding `peer`, its (value, count) of one metric."""

    def __init__(self, peer: torch.Tensor):
        self.peer = peer

    def reduce(self, tensor, reduction="sum"):
        return tensor + self.peer

    def gather(self, tensor):
        return torch.cat([tensor, self.peer[None]])


def step(**metrics):
    return StepOutput(torch.zeros(()), {k: torch.tensor(v) for k, v in metrics.items()}, 0)


def test_min_max_over_micro_batches_and_mean_unchanged():
    sums = MetricSums()
    sums.add(step(**{"rewards/min": [3.0, -1.0], "rewards/max": [3.0, -1.0], "margin": [1.0, 3.0]}))
    sums.add(step(**{"rewards/min": [0.5], "rewards/max": [7.0], "margin": [5.0]}))
    out = sums.reduce(OneProcess())
    assert out == pytest.approx({"rewards/min": -1.0, "rewards/max": 7.0, "margin": 3.0})


def test_nan_values_are_ignored_and_an_all_nan_metric_is_left_out():
    sums = MetricSums()
    nan = float("nan")
    sums.add(step(**{"a/min": [nan, 2.0], "b/max": [nan, nan]}))
    sums.add(step(**{"a/min": [nan], "b/max": [nan]}))
    assert sums.reduce(OneProcess()) == {"a/min": 2.0}


def test_extremes_across_processes():
    mine, theirs = MetricSums(), MetricSums()
    mine.add(step(**{"r/min": [1.0, 2.0], "r/max": [1.0, 2.0], "r/mean": [1.0, 2.0]}))
    theirs.add(step(**{"r/min": [-4.0], "r/max": [9.0], "r/mean": [6.0]}))
    for name, expected in (("r/min", -4.0), ("r/max", 9.0), ("r/mean", 3.0)):
        one = MetricSums()
        one.tensors = {name: mine.tensors[name]}
        assert one.reduce(TwoProcesses(theirs.tensors[name])) == {name: expected}
