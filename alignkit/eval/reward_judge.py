"""A judge backed by a reward model (or an ensemble): the higher-scored answer wins.

It answers the same ``compare(prompt, first, second)`` question as an LLM judge, so win rate
treats both alike. A reward model has no position bias, so asking both orders (as win rate does)
gives mirrored verdicts; scores are cached per (prompt, answer) so each answer is scored once,
and :meth:`RewardModelJudge.prefetch` scores many answers in batches before the comparisons.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from alignkit.eval.samples import Prompt, prompt_key

if TYPE_CHECKING:
    from alignkit.eval.judge import Verdict


class Scorer(Protocol):
    """What alignkit.models.reward's scorers offer: (N,) float32 rewards, no grad."""

    def score(self, prompts: list[Any], responses: list[str], *, batch_size: int = 8) -> Tensor: ...


class RewardModelJudge:
    """Verdicts from reward scores: 'tie' when the scores differ by at most `tie_tolerance`."""

    def __init__(self, scorer: Scorer, *, tie_tolerance: float = 0.0, batch_size: int = 8):
        if tie_tolerance < 0:
            raise ValueError("tie_tolerance must be >= 0")
        self.scorer = scorer
        self.tie_tolerance = tie_tolerance
        self.batch_size = batch_size
        self._cache: dict[tuple[str, str], float] = {}  # (prompt_key, response) -> score

    def prefetch(self, prompts: list[Prompt], responses: list[str]) -> Tensor:
        """(N,) scores of each (prompt, response), scoring only the ones not cached yet."""
        keys = [(prompt_key(p), r) for p, r in zip(prompts, responses, strict=True)]
        # each uncached key once, with its prompt as given: a conversation is scored whole
        pending: dict[tuple[str, str], tuple[Prompt, str]] = {}
        for key, prompt, response in zip(keys, prompts, responses, strict=True):
            if key not in self._cache:
                pending.setdefault(key, (prompt, response))
        todo = list(pending)
        if todo:
            scores = self.scorer.score(
                [p for p, _ in pending.values()],
                [r for _, r in pending.values()],
                batch_size=self.batch_size,
            )
            if scores.shape != (len(todo),):
                raise ValueError(
                    f"the reward scorer returned shape {tuple(scores.shape)} for {len(todo)} "
                    "answers, expected one score each"
                )
            for key, value in zip(todo, scores.tolist(), strict=True):
                self._cache[key] = float(value)
        return torch.tensor([self._cache[k] for k in keys], dtype=torch.float32)

    def compare(self, prompt: Prompt, first: str, second: str) -> Verdict:
        s1, s2 = self.prefetch([prompt, prompt], [first, second]).tolist()
        return verdict_from_scores(s1, s2, self.tie_tolerance)


def verdict_from_scores(first: float, second: float, tie_tolerance: float = 0.0) -> Verdict:
    """'first' / 'second' for the clearly higher score, 'tie' within the tolerance, None for NaN
    (a broken score is reported as unparseable, never guessed)."""
    if math.isnan(first) or math.isnan(second):
        return None
    if abs(first - second) <= tie_tolerance:
        return "tie"
    return "first" if first > second else "second"
