"""Win rate: the both-orders combination rule, counting, the Wilson interval, partial results."""

from __future__ import annotations

import json
import math

import pytest

from alignkit.errors import AlignkitError
from alignkit.eval.judge import JudgeUnavailable
from alignkit.eval.winrate import WinRate, prompt_record, wilson_interval, win_rate


class PositionJudge:
    """Always prefers the same position, whatever the answers say."""

    def __init__(self, verdict):
        self.verdict = verdict
        self.calls = []

    def compare(self, prompt, first, second):
        self.calls.append((prompt, first, second))
        return self.verdict


class ContentJudge:
    """Prefers the answer containing 'good'; a tie when both or neither do."""

    def compare(self, prompt, first, second):
        a, b = "good" in first, "good" in second
        return "tie" if a == b else "first" if a else "second"


@pytest.mark.parametrize(
    "model_first, reference_first, score, outcome",
    [
        ("first", "second", 1.0, "win"),  # both orders prefer the model
        ("second", "first", 0.0, "loss"),
        ("first", "first", 0.5, "tie"),  # pure position bias
        ("second", "second", 0.5, "tie"),
        ("tie", "tie", 0.5, "tie"),
        ("first", "tie", 0.75, "win"),
        ("tie", "first", 0.25, "loss"),
        (None, "second", None, "unparseable"),
        ("first", None, None, "unparseable"),
    ],
)
def test_combination_rule(model_first, reference_first, score, outcome):
    rec = prompt_record(0, "p", model_first, reference_first)
    assert rec["score"] == score and rec["outcome"] == outcome


@pytest.mark.parametrize("verdict", ["first", "second"])
def test_position_bias_cancels(verdict):
    judge = PositionJudge(verdict)
    result = win_rate(["p1", "p2", "p3"], ["m1", "m2", "m3"], ["r1", "r2", "r3"], judge)
    assert (result.wins, result.losses, result.ties, result.n) == (0, 0, 3, 3)
    assert result.win_rate == 0.5
    # each prompt asked twice, the second time with the answers swapped
    assert judge.calls[:2] == [("p1", "m1", "r1"), ("p1", "r1", "m1")]
    assert len(judge.calls) == 6


def test_counts_and_rate():
    model = ["good", "bad", "good", "bad", "good"]
    ref = ["bad", "good", "good", "bad", "bad"]
    result = win_rate(["p"] * 5, model, ref, ContentJudge())
    assert (result.wins, result.losses, result.ties, result.unparseable) == (2, 1, 2, 0)
    assert result.n == 5
    assert result.win_rate == pytest.approx((2 + 1) / 5)
    assert (result.ci_low, result.ci_high) == pytest.approx(wilson_interval(0.6, 5))
    assert [r["outcome"] for r in result.records] == ["win", "loss", "tie", "tie", "win"]


def test_wilson_matches_textbook_values():
    # 8 successes in 10: the Wilson 95% interval is 0.490 to 0.943 (Newcombe 1998, table I)
    low, high = wilson_interval(0.8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    # 0 of 10: the lower end is exactly 0, the upper end z^2 / (n + z^2) = 0.2775
    low, high = wilson_interval(0.0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(0.5, 0) == (0.0, 1.0)


def test_interval_narrows_with_more_prompts():
    small = WinRate.from_records([prompt_record(i, "p", "first", "second") for i in range(4)])
    big = WinRate.from_records([prompt_record(i, "p", "first", "second") for i in range(40)])
    assert small.win_rate == big.win_rate == 1.0
    assert small.ci_high == big.ci_high == 1.0
    assert small.ci_low < big.ci_low < 1.0


def test_unparseable_is_counted_not_guessed():
    class Mixed:
        def __init__(self):
            self.i = 0

        def compare(self, prompt, first, second):
            self.i += 1
            return None if self.i == 2 else "first" if "m" in first else "second"

    result = win_rate(["a", "b"], ["m", "m"], ["r", "r"], Mixed())
    assert result.unparseable == 1 and result.n == 1 and result.wins == 1
    assert result.win_rate == 1.0
    assert result.records[0]["outcome"] == "unparseable"


def test_all_unparseable_gives_no_rate_and_valid_json():
    result = win_rate(["a"], ["m"], ["r"], PositionJudge(None))
    assert result.n == 0 and result.unparseable == 1 and math.isnan(result.win_rate)
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert d["win_rate"] is None and (d["ci_low"], d["ci_high"]) == (0.0, 1.0)
    assert d["records"][0]["outcome"] == "unparseable"


def test_on_record_sees_each_prompt_in_order():
    seen = []
    result = win_rate(
        ["p0", "p1", "p2"], ["good"] * 3, ["bad"] * 3, ContentJudge(), on_record=seen.append
    )
    assert [r["index"] for r in seen] == [0, 1, 2]
    assert seen == result.records
    assert WinRate.from_records(seen) == result  # saved records rebuild the same result


def test_unavailable_judge_keeps_partial_results():
    class Dying(ContentJudge):
        def __init__(self):
            self.calls = 0

        def compare(self, prompt, first, second):
            self.calls += 1
            if self.calls == 6:  # the second order of the third prompt
                raise JudgeUnavailable("gone")
            return super().compare(prompt, first, second)

    saved = []
    with pytest.raises(JudgeUnavailable) as info:
        model = ["good", "bad", "good", "x", "y"]
        win_rate(["p"] * 5, model, ["bad"] * 5, Dying(), on_record=saved.append)
    partial = info.value.partial
    assert isinstance(partial, WinRate)
    assert (partial.wins, partial.ties, partial.n) == (1, 1, 2)
    assert partial.records == saved  # the half-judged third prompt is in neither


def test_lengths_must_match():
    with pytest.raises(AlignkitError, match="2 prompts, 1 model answers"):
        win_rate(["a", "b"], ["m"], ["r", "r"], ContentJudge())
