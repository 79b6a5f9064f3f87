"""The evaluation tasks of `alignkit eval`: which one a data file calls for, and each runner.

A runner takes the loaded models and one file's rows and returns one result of the report:
``{"task", "data", "n", "metrics": {name: {"before", "after", "delta"}}, "details"}``, where
``before`` is the reference and ``after`` the evaluated model (None where a side does not apply:
the implicit reward of the reference against itself is zero by definition, so it is not shown).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from alignkit.data.formats import detect_format
from alignkit.data.io import LocatedRecords
from alignkit.data.preference import PREFERENCE_FORMATS
from alignkit.errors import AlignkitError, DataError
from alignkit.eval.capability import ANSWER_MARK
from alignkit.eval.loading import EvalModels, Which
from alignkit.eval.samples import prompt_of, prompts_from_rows

EXPECTED = {
    "preference": "prompt/chosen/rejected rows, or raw HH chosen/rejected transcripts",
    "gsm8k": f"question/answer rows whose answer ends with '{ANSWER_MARK} N'",
    "multiple_choice": "question/choices/answer rows (answer: a 0-based index or a choice's text)",
    "win_rate": "prompt rows, with --reward-model or --judge-url",
    "samples": "prompt (or question / instruction) rows",
}
_PRIORITY = ("multiple_choice", "gsm8k", "preference", "win_rate", "samples")
_DETECT_ROWS = 50
MAX_PAIR_TOKENS = 2048


def row_tasks(row: dict[str, Any]) -> set[str]:
    """Every task one row could serve."""
    fits = set()
    if isinstance(row.get("choices"), list) and "question" in row and "answer" in row:
        fits.add("multiple_choice")
    answer = row.get("answer")
    if isinstance(row.get("question"), str) and isinstance(answer, str) and ANSWER_MARK in answer:
        fits.add("gsm8k")
    try:
        if detect_format([row]) in PREFERENCE_FORMATS:
            fits.add("preference")
    except DataError:
        pass
    if prompt_of(row) is not None:
        fits |= {"win_rate", "samples"}
    return fits


def detect_task(
    records: list[dict], source: str, *, forced: str, has_judge: bool, samples: int
) -> str:
    """The task a file's rows call for (or `forced`, checked against the rows)."""
    votes: Counter[str] = Counter()
    for row in records[:_DETECT_ROWS]:
        votes.update(row_tasks(row))
    best = max(votes.values(), default=0)
    fits = [t for t in _PRIORITY if best and votes[t] == best]
    if forced != "auto":
        if forced in fits:
            return forced
        raise _no_fit(records, source, f"--task {forced} expects {EXPECTED[forced]}")
    if not fits:
        raise _no_fit(records, source, "these rows fit no evaluation task")
    task = fits[0]
    if task in ("win_rate", "samples"):
        if has_judge:
            return "win_rate"
        if samples:
            return "samples"
        raise DataError(
            "prompt-only rows are evaluated by win rate against the reference, which needs a judge",
            where=source,
            hint="pass --reward-model PATH or --judge-url URL --judge-model NAME, or --samples N "
            "to read both models' answers side by side",
        )
    return task


def _no_fit(records: list[dict], source: str, what: str) -> DataError:
    cols = sorted({k for r in records[:_DETECT_ROWS] for k in r})
    return DataError(
        f"{what}; found columns: {', '.join(cols) or '(none)'}",
        where=source,
        hint="eval reads " + "; ".join(f"{t}: {d}" for t, d in EXPECTED.items()),
    )


# --------------------------------------------------------------------------- results


def _number(value: float | None) -> float | None:
    """JSON has no NaN: an undefined number (nothing judged yet) is null."""
    if value is None or math.isnan(value):
        return None
    return float(value)


def metric(before: float | None, after: float | None) -> dict[str, float | None]:
    before, after = _number(before), _number(after)
    delta = after - before if before is not None and after is not None else None
    return {"before": before, "after": after, "delta": delta}


def result(task: str, data: str, n: int, metrics: dict, details: dict) -> dict[str, Any]:
    return {"task": task, "data": data, "n": n, "metrics": metrics, "details": details}


class PartialResult(Exception):
    """A task stopped by an unavailable judge, with the result of what it finished."""

    def __init__(self, result: dict[str, Any], cause: AlignkitError):
        super().__init__(str(cause))
        self.result, self.cause = result, cause


@dataclass
class TaskContext:
    models: EvalModels
    answers: Any  # run.Answers: greedy answers, cached per model and prompt
    batch_size: int
    beta: float
    judge: Any = None

    @property
    def tokenizer(self) -> Any:
        return self.models.tokenizer

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else 0

    @property
    def sides(self) -> list[Which]:
        """The models to run: the reference ("before") when there is one, and the model."""
        return ["reference", "model"] if self.models.has_reference else ["model"]

    def logps_module(self, module: Any) -> Any:
        from alignkit.train.forward import LogpsModel

        return LogpsModel(module).eval()


# --------------------------------------------------------------------------- preference


def run_preference(ctx: TaskContext, source: str, rows: LocatedRecords) -> dict[str, Any]:
    """Implicit-reward accuracy against the reference, and plain log-likelihood preference."""
    from alignkit.config import DataConfig
    from alignkit.data.preference import build_pairs, resolve_pair_format
    from alignkit.eval.preference import implicit_reward_accuracy, loglik_preference, pair_scores

    limit = getattr(ctx.models.model.config, "max_position_embeddings", None) or MAX_PAIR_TOKENS
    cfg = DataConfig(train=source, max_length=min(limit, MAX_PAIR_TOKENS), truncation="truncate")
    fmt = resolve_pair_format(rows.records, cfg, source=source, allowed=PREFERENCE_FORMATS)
    pairs, stats = build_pairs(rows, fmt, cfg, ctx.tokenizer)
    if not pairs:
        raise DataError(
            f"none of the {stats.rows_read} pairs can be evaluated (too long, empty, or their "
            "chosen and rejected answer different prompts)",
            where=source,
            hint="run `alignkit data check --method dpo` on the file for the reasons",
        )
    scores = {}
    for side in ctx.sides:
        with ctx.models.use(side) as module:
            scores[side] = pair_scores(ctx.logps_module(module), pairs, ctx.pad_id, ctx.batch_size)
    after = loglik_preference(scores["model"])
    before = loglik_preference(scores["reference"]) if "reference" in scores else None
    metrics = {}
    if before is not None:
        acc = implicit_reward_accuracy(scores["model"].logps, scores["reference"].logps, ctx.beta)
        metrics["rewards/accuracies"] = metric(None, acc.accuracy)
        metrics["rewards/margins"] = metric(None, acc.margin)
    for name, key in (
        ("logps/accuracy", "accuracy"),
        ("logps/accuracy_norm", "accuracy_norm"),
        ("logps/margin", "margin"),
        ("logps/margin_norm", "margin_norm"),
    ):
        metrics[name] = metric(getattr(before, key) if before else None, getattr(after, key))
    for i, name in enumerate(("logps/chosen", "logps/rejected")):
        ref = scores["reference"].logps[:, i].mean().item() if before else None
        metrics[name] = metric(ref, scores["model"].logps[:, i].mean().item())
    details = {
        "format": fmt,
        "beta": ctx.beta if before is not None else None,
        "rows": stats.rows_read,
        "truncated": stats.truncated,
        "dropped": stats.rows_read - stats.kept,
    }
    return result("preference", source, len(pairs), metrics, details)


# --------------------------------------------------------------------------- capability


def run_gsm8k(ctx: TaskContext, source: str, rows: LocatedRecords) -> dict[str, Any]:
    """Greedy answers, exact match on the number after '####', before and after."""
    from alignkit.eval.capability import exact_match, gsm8k_items

    items = gsm8k_items(rows)
    prompts = [it.question for it in items]
    refs = [it.answer for it in items]
    em = {side: exact_match(ctx.answers.get(side, prompts), refs) for side in ctx.sides}
    before = em.get("reference")
    metrics = {
        "exact_match": metric(before.accuracy if before else None, em["model"].accuracy),
        "no_answer": metric(before.no_answer if before else None, em["model"].no_answer),
    }
    details = {
        "correct": {side: e.correct for side, e in em.items()},
        "no_answer": {side: e.no_answer for side, e in em.items()},
        "decoding": "greedy",
    }
    return result("gsm8k", source, len(items), metrics, details)


def run_multiple_choice(ctx: TaskContext, source: str, rows: LocatedRecords) -> dict[str, Any]:
    """Accuracy of the most likely choice, by summed and by per-token log-prob."""
    from alignkit.eval.capability import (
        choice_accuracy,
        choice_items,
        choice_logps,
        tokenize_choices,
    )

    items = choice_items(rows)
    examples = tokenize_choices(items, ctx.tokenizer)
    answers = [it.answer for it in items]
    acc = {}
    for side in ctx.sides:
        with ctx.models.use(side) as module:
            scores = choice_logps(ctx.logps_module(module), examples, ctx.pad_id, ctx.batch_size)
        acc[side] = choice_accuracy(scores, answers)
    before = acc.get("reference")
    metrics = {
        "accuracy": metric(before.accuracy if before else None, acc["model"].accuracy),
        "accuracy_norm": metric(
            before.accuracy_norm if before else None, acc["model"].accuracy_norm
        ),
    }
    chance = sum(1 / len(it.choices) for it in items) / len(items)
    return result("multiple_choice", source, len(items), metrics, {"chance": chance})


# --------------------------------------------------------------------------- win rate


def run_win_rate(ctx: TaskContext, source: str, rows: LocatedRecords) -> dict[str, Any]:
    """Both models answer every prompt; the judge compares them in both orders."""
    from alignkit.eval.winrate import win_rate

    if ctx.judge is None:
        raise AlignkitError(
            "win rate needs a judge", hint="pass --reward-model PATH or --judge-url URL"
        )
    if not ctx.models.has_reference:
        raise AlignkitError(
            "win rate compares the model with a reference, and this model has none",
            hint="pass --reference PATH (usually the model training started from)",
        )
    prompts = prompts_from_rows(rows.records, source)
    model_answers = ctx.answers.get("model", prompts)
    reference_answers = ctx.answers.get("reference", prompts)
    metrics = {}
    prefetch = getattr(ctx.judge, "prefetch", None)
    if callable(prefetch):  # a reward-model judge: the mean reward is a before/after too
        before = prefetch(prompts, reference_answers).mean().item()
        metrics["reward"] = metric(before, prefetch(prompts, model_answers).mean().item())
    try:
        wr = win_rate(prompts, model_answers, reference_answers, ctx.judge)
    except AlignkitError as exc:
        partial = getattr(exc, "partial", None)
        if partial is None:
            raise
        raise PartialResult(win_result(source, partial, metrics, error=str(exc)), exc) from exc
    return win_result(source, wr, metrics)


def win_result(source: str, wr: Any, metrics: dict, error: str | None = None) -> dict[str, Any]:
    metrics = {"win_rate": metric(None, wr.win_rate), **metrics}
    details: dict[str, Any] = {
        k: getattr(wr, k) for k in ("wins", "losses", "ties", "unparseable", "ci_low", "ci_high")
    }
    details["ci_low"], details["ci_high"] = _number(wr.ci_low), _number(wr.ci_high)
    if hasattr(wr, "to_dict"):
        details["records"] = wr.to_dict().get("records", [])
    if error:
        details["error"] = error
    return result("win_rate", source, wr.n, metrics, details)


RUNNERS = {
    "preference": run_preference,
    "gsm8k": run_gsm8k,
    "multiple_choice": run_multiple_choice,
    "win_rate": run_win_rate,
}
