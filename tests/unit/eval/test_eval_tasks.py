"""Which task a data file calls for, and the GSM8K runner's before/after from known answers."""

from types import SimpleNamespace

import pytest

from alignkit.data.io import LocatedRecords
from alignkit.errors import DataError
from alignkit.eval.tasks import TaskContext, detect_task, metric, run_gsm8k

ROWS = {
    "preference": [{"prompt": "p", "chosen": "a", "rejected": "b"}],
    "hh": [
        {"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    ],
    "gsm8k": [{"question": "1+1?", "answer": "1+1=2\n#### 2"}],
    "multiple_choice": [{"question": "q", "choices": ["a", "b"], "answer": 0}],
    "prompts": [{"prompt": "hello"}],
}


def detect(rows, forced="auto", has_judge=False, samples=0):
    return detect_task(rows, "f.jsonl", forced=forced, has_judge=has_judge, samples=samples)


def test_detection_by_columns():
    assert detect(ROWS["preference"]) == "preference"
    assert detect(ROWS["hh"]) == "preference"
    assert detect(ROWS["gsm8k"]) == "gsm8k"
    assert detect(ROWS["multiple_choice"]) == "multiple_choice"
    assert detect(ROWS["prompts"], has_judge=True) == "win_rate"
    assert detect(ROWS["prompts"], samples=2) == "samples"
    # any file with prompts can be read side by side, a GSM8K file judged for win rate
    assert detect(ROWS["gsm8k"], forced="samples") == "samples"
    assert detect(ROWS["gsm8k"], forced="win_rate") == "win_rate"


def test_a_question_answer_file_without_marks_is_not_gsm8k():
    with pytest.raises(DataError, match="--task gsm8k expects"):
        detect([{"question": "q", "answer": "2"}], forced="gsm8k")


def test_metric_delta_and_nan():
    assert metric(0.25, 0.75) == {"before": 0.25, "after": 0.75, "delta": 0.5}
    assert metric(None, 0.5)["delta"] is None
    assert metric(0.1, float("nan")) == {"before": 0.1, "after": None, "delta": None}


class KnownAnswers:
    def __init__(self, table):
        self.table = table

    def get(self, which, prompts):
        return [self.table[which][p] for p in prompts]


def test_gsm8k_before_and_after_from_known_answers():
    rows = [
        {"question": "a", "answer": "#### 1,000"},
        {"question": "b", "answer": "#### 7"},
        {"question": "c", "answer": "#### 3"},
    ]
    answers = KnownAnswers(
        {
            "reference": {"a": "it is 1000", "b": "#### 8", "c": "#### 3.0"},
            "model": {"a": "#### $1000", "b": "#### 7", "c": "3"},
        }
    )
    ctx = TaskContext(SimpleNamespace(has_reference=True), answers, batch_size=2, beta=0.1)
    located = LocatedRecords(rows, ["g:1", "g:2", "g:3"])
    res = run_gsm8k(ctx, "g.jsonl", located)
    assert res["n"] == 3
    em = res["metrics"]["exact_match"]
    assert em["before"] == pytest.approx(1 / 3) and em["after"] == pytest.approx(2 / 3)
    assert em["delta"] == pytest.approx(1 / 3)
    assert res["metrics"]["no_answer"] == {"before": 1.0, "after": 1.0, "delta": 0.0}
    assert res["details"]["correct"] == {"reference": 1, "model": 2}


def test_table_prints_counts_as_whole_numbers_and_rates_with_decimals():
    from alignkit.eval.run import _fmt

    assert _fmt(6.0, count=True) == "6"
    assert _fmt(-4.0, count=True, sign=True) == "-4"
    assert _fmt(0.0833333, sign=True) == "+0.0833"
    assert _fmt(None) == "-"
