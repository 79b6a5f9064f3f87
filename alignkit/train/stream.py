"""Deterministic order of micro-batches, shared by every process and by resumed runs.

The stream is a flat sequence of global micro-batches across epochs; micro-batch ``i`` is the same
examples whether the run is continuous or resumed, and each process takes its contiguous slice of
it. That is what makes a 2-process run equal a 1-process run with twice the batch, and a resumed
run equal an uninterrupted one.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from alignkit.data.batching import length_grouped_order, prompt_grouped_order


@dataclass
class MicroBatchStream:
    lengths: list[int]
    batch_size: int  # per process
    world_size: int
    seed: int
    group_by_length: bool = True
    prompt_groups: list[int] | None = None  # per example; given: the prompt-grouped order
    _orders: dict[int, list[int]] = field(default_factory=dict, repr=False)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def per_epoch(self) -> int:
        """Global micro-batches per epoch; a last partial one is kept if every process gets
        at least one example (so no process runs an empty forward)."""
        full, rest = divmod(len(self.lengths), self.global_batch)
        return full + (1 if rest >= self.world_size else 0)

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            seed = self.seed + epoch
            if self.prompt_groups is not None:
                self._orders[epoch] = prompt_grouped_order(self.prompt_groups, seed)
            elif self.group_by_length:
                self._orders[epoch] = length_grouped_order(self.lengths, self.global_batch, seed)
            else:
                order = list(range(len(self.lengths)))
                random.Random(seed).shuffle(order)
                self._orders[epoch] = order
        return self._orders[epoch]

    def indices(self, micro_index: int, rank: int) -> list[int]:
        """Example indices of global micro-batch ``micro_index`` that process ``rank`` takes."""
        epoch, pos = divmod(micro_index, self.per_epoch)
        chunk = self.order(epoch)[pos * self.global_batch : (pos + 1) * self.global_batch]
        share = math.ceil(len(chunk) / self.world_size)
        return chunk[rank * share : (rank + 1) * share]

    def epoch_of(self, micro_index: int) -> float:
        return micro_index / max(self.per_epoch, 1)


def total_steps(per_epoch: int, epochs: float, grad_accum: int, max_steps: int | None) -> int:
    """Optimizer steps in the run: ``max_steps`` wins over ``epochs`` (the data then cycles)."""
    if max_steps:
        return max_steps
    return math.ceil(max(1, math.floor(per_epoch * epochs)) / grad_accum)
