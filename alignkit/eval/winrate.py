"""Win rate of a model against a reference, judged pairwise with both answer orders.

Combination rule. Every prompt is judged twice: model answer first, then reference answer first.
Each judgment scores the model 1 (its answer preferred), 0.5 (tie) or 0 (reference preferred);
the prompt's score is the mean of the two. A prompt is a *win* when that mean is above 0.5, a
*loss* below 0.5, and a *tie* at exactly 0.5. A judge that always picks the same position thus
produces ties, not wins or losses: position bias cancels. A prompt with either judgment
unparseable is counted in ``unparseable`` and left out of the rate (one order alone would let
position bias back in).

Rate and interval. ``win_rate = (wins + ties / 2) / n`` over the ``n = wins + losses + ties``
prompts that count, with a 95% Wilson score interval on that proportion (ties as half a win;
a tie varies less than a coin flip, so the interval is if anything conservative). With n = 0 the
rate is NaN (None in ``to_dict``) and the interval is [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from alignkit.errors import AlignkitError
from alignkit.eval.judge import Judge, JudgeUnavailable, OpenAIJudge, Verdict, parse_verdict

__all__ = [
    "Judge",
    "JudgeUnavailable",
    "OpenAIJudge",
    "Verdict",
    "WinRate",
    "parse_verdict",
    "prompt_record",
    "wilson_interval",
    "win_rate",
]

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal

# The model's score for a verdict about positions, by which position the model's answer had
_MODEL_FIRST = {"first": 1.0, "tie": 0.5, "second": 0.0}
_REFERENCE_FIRST = {"first": 0.0, "tie": 0.5, "second": 1.0}


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``p`` observed over ``n`` trials."""
    if n == 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class WinRate:
    wins: int
    losses: int
    ties: int
    unparseable: int  # prompts with at least one unparseable judgment, not in n
    n: int  # prompts in the rate: wins + losses + ties
    win_rate: float
    ci_low: float
    ci_high: float
    records: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]]) -> WinRate:
        """Totals, rate and interval from per-prompt records (also for resuming saved ones)."""
        outcomes = [r["outcome"] for r in records]
        wins, losses, ties = (outcomes.count(k) for k in ("win", "loss", "tie"))
        n = wins + losses + ties
        rate = (wins + ties / 2) / n if n else math.nan
        low, high = wilson_interval(rate if n else 0.0, n)
        unparseable = outcomes.count("unparseable")
        return cls(wins, losses, ties, unparseable, n, rate, low, high, list(records))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if math.isnan(self.win_rate):  # JSON has no NaN
            out["win_rate"] = None
        out["interval"] = "wilson 95%"
        return out


def prompt_record(index: int, prompt: str, model_first: Verdict, reference_first: Verdict) -> dict:
    """One prompt's two verdicts (about positions) combined by the rule in the module doc."""
    if model_first is None or reference_first is None:
        score, outcome = None, "unparseable"
    else:
        score = (_MODEL_FIRST[model_first] + _REFERENCE_FIRST[reference_first]) / 2
        outcome = "win" if score > 0.5 else "loss" if score < 0.5 else "tie"
    return {
        "index": index,
        "prompt": prompt,
        "model_first": model_first,
        "reference_first": reference_first,
        "score": score,
        "outcome": outcome,
    }


def _judge_prompt(judge: Judge, index: int, prompt: str, model: str, reference: str) -> dict:
    model_first = judge.compare(prompt, model, reference)
    raw_1 = getattr(judge, "last_answer", None)
    reference_first = judge.compare(prompt, reference, model)
    raw_2 = getattr(judge, "last_answer", None)
    record = prompt_record(index, prompt, model_first, reference_first)
    if hasattr(judge, "last_answer"):  # the judge's own words, to report what was unparseable
        record["raw"] = [raw_1, raw_2]
    return record


def win_rate(
    prompts: Sequence[str],
    model_answers: Sequence[str],
    reference_answers: Sequence[str],
    judge: Judge,
    *,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> WinRate:
    """Judge every prompt in both orders; ``on_record(record)`` runs after each prompt.

    When the judge becomes unavailable, the JudgeUnavailable raised carries ``partial``: the
    WinRate of the prompts fully judged so far.
    """
    if not len(prompts) == len(model_answers) == len(reference_answers):
        raise AlignkitError(
            f"win rate needs one model and one reference answer per prompt: got "
            f"{len(prompts)} prompts, {len(model_answers)} model answers and "
            f"{len(reference_answers)} reference answers"
        )
    records: list[dict[str, Any]] = []
    triples = zip(prompts, model_answers, reference_answers, strict=True)
    for i, (prompt, mine, ref) in enumerate(triples):
        try:
            record = _judge_prompt(judge, i, prompt, mine, ref)
        except JudgeUnavailable as exc:
            exc.partial = WinRate.from_records(records)
            raise
        records.append(record)
        if on_record is not None:
            on_record(record)
    return WinRate.from_records(records)
