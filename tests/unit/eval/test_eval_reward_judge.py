"""A judge backed by reward scores: verdicts from known scores, each answer scored once."""

import math

import pytest
import torch

from alignkit.eval.reward_judge import RewardModelJudge, verdict_from_scores


class TableScorer:
    """Scores from a fixed table of (prompt, response) -> reward; records every call."""

    def __init__(self, table):
        self.table = table
        self.calls: list[list[tuple[str, str]]] = []

    def score(self, prompts, responses, *, batch_size=8):
        pairs = list(zip(prompts, responses, strict=True))
        self.calls.append(pairs)
        return torch.tensor([self.table[p] for p in pairs], dtype=torch.float32)


TABLE = {
    ("p", "good"): 2.0,
    ("p", "bad"): -1.0,
    ("p", "same"): 2.0,
    ("q", "good"): -5.0,
    ("q", "nan"): math.nan,
}


def test_verdicts_from_known_scores():
    judge = RewardModelJudge(TableScorer(TABLE))
    assert judge.compare("p", "good", "bad") == "first"
    assert judge.compare("p", "bad", "good") == "second"
    assert judge.compare("p", "good", "same") == "tie"
    # the prompt matters: the same answer scores differently under another prompt
    assert judge.compare("q", "good", "good") == "tie"
    assert judge.compare("q", "good", "nan") is None  # a broken score is not guessed


def test_tie_tolerance():
    assert verdict_from_scores(1.0, 1.2, tie_tolerance=0.25) == "tie"
    assert verdict_from_scores(1.0, 1.3, tie_tolerance=0.25) == "second"
    with pytest.raises(ValueError):
        RewardModelJudge(TableScorer(TABLE), tie_tolerance=-1)


def test_each_answer_is_scored_once_in_batches():
    scorer = TableScorer(TABLE)
    judge = RewardModelJudge(scorer)
    scores = judge.prefetch(["p", "p", "p"], ["good", "bad", "good"])
    assert scores.tolist() == [2.0, -1.0, 2.0]
    assert scorer.calls == [[("p", "good"), ("p", "bad")]]  # one batch, duplicates once
    judge.compare("p", "good", "bad")
    judge.compare("p", "bad", "good")  # both orders, as win rate asks
    assert len(scorer.calls) == 1


def test_a_scorer_returning_the_wrong_shape_is_caught():
    class Broken:
        def score(self, prompts, responses, *, batch_size=8):
            return torch.zeros(len(prompts), 2)

    with pytest.raises(ValueError, match="expected one score each"):
        RewardModelJudge(Broken()).compare("p", "a", "b")
