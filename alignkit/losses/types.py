"""What every loss returns."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class LossOutput(NamedTuple):
    """Per-example losses plus detached metrics.

    losses: (B,) per-example loss terms; the trainer sums them and divides by the number of
        normalisation units (tokens or examples) of the whole accumulated batch.
    metrics: name -> (B,) detached per-example values, averaged by the trainer.
    """

    losses: Tensor
    metrics: dict[str, Tensor]
