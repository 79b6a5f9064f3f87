"""Capability-regression checks: did alignment cost the model what it could do before?

- GSM8K-style exact match: the model answers a word problem by greedy decoding and is right when
  the number after its ``####`` equals the reference's (Cobbe et al. 2021 mark the final answer
  that way). Numbers are compared after removing thousands separators, a currency sign and a
  trailing ``.0``; an answer without ``####`` is wrong and counted separately, since "never
  learned the answer format" and "got the sum wrong" call for different fixes.
- Multiple choice by log-likelihood: each choice is scored as the assistant's reply to the
  question (chat template applied, end-of-turn token included) and the most likely one is the
  model's answer, by summed log-prob and by log-prob per token (the length-normalised variant
  does not favour short choices).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from alignkit.data.io import LocatedRecords
from alignkit.data.pair_batching import collate_rows
from alignkit.data.preference import encode_responses, render_responses
from alignkit.errors import DataError

ANSWER_MARK = "####"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

# --------------------------------------------------------------------------- GSM8K


def normalise_number(text: str) -> str | None:
    """'$1,234.00' -> '1234', '-3.50' -> '-3.5', '72.' -> '72'; None when there is no number."""
    cleaned = text.replace(",", "").replace("$", "").strip()
    match = _NUMBER.search(cleaned)
    if match is None:
        return None
    number = match.group(0)
    if "." in number:
        number = number.rstrip("0").rstrip(".")  # 12.50 == 12.5, 72.0 == 72
    if number in ("-0", ""):
        number = "0"
    return number


def extract_answer(text: str) -> str | None:
    """The normalised number after the last '####' of a solution; None when there is none."""
    if ANSWER_MARK not in text:
        return None
    tail = text.rsplit(ANSWER_MARK, 1)[1]
    return normalise_number(tail.strip().splitlines()[0] if tail.strip() else "")


class ExactMatch(NamedTuple):
    accuracy: float
    correct: int
    no_answer: int  # generations without '####'
    n: int


def exact_match(generations: list[str], references: list[str]) -> ExactMatch:
    """Share of generations whose '####' number equals the reference solution's."""
    correct = no_answer = 0
    for gen, ref in zip(generations, references, strict=True):
        got = extract_answer(gen)
        if ANSWER_MARK not in gen:
            no_answer += 1
        correct += got is not None and got == extract_answer(ref)
    n = len(generations)
    return ExactMatch(correct / n if n else 0.0, correct, no_answer, n)


@dataclass
class GSM8KItem:
    question: str
    answer: str  # the reference solution, ending in '#### N'


def gsm8k_items(located: LocatedRecords) -> list[GSM8KItem]:
    items = []
    for row, where in zip(located.records, located.locations, strict=True):
        question, answer = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not isinstance(answer, str):
            raise DataError(
                "a GSM8K row needs 'question' and 'answer' strings; columns: " + ", ".join(row),
                where=where,
            )
        if extract_answer(answer) is None:
            raise DataError(
                f"the answer has no number after '{ANSWER_MARK}' (ends {answer[-40:]!r})",
                where=where,
                hint="GSM8K answers end with '#### N', the final number",
            )
        items.append(GSM8KItem(question, answer))
    return items


# --------------------------------------------------------------------------- multiple choice


@dataclass
class ChoiceItem:
    question: str
    choices: list[str]
    answer: int  # index into choices


def _answer_index(answer: Any, choices: list[str], where: str) -> int:
    """An int index in range, or the text of one of the choices; anything else is refused."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < len(choices):
            return answer
        raise DataError(
            f"answer index {answer} is out of range for {len(choices)} choices",
            where=where,
            hint=f"answer is a 0-based index (0..{len(choices) - 1}) or the text of a choice",
        )
    if isinstance(answer, str) and answer in choices:
        return choices.index(answer)
    raise DataError(
        f"answer {answer!r} is not one of the choices {choices}",
        where=where,
        hint="answer is a 0-based index into choices or the exact text of one choice",
    )


def choice_items(located: LocatedRecords) -> list[ChoiceItem]:
    items = []
    for row, where in zip(located.records, located.locations, strict=True):
        question, choices = row.get("question"), row.get("choices")
        if not isinstance(question, str):
            raise DataError("'question' must be a string", where=where)
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise DataError(
                f"'choices' must be a list of at least two non-empty strings, got {choices!r}",
                where=where,
            )
        if "answer" not in row:
            raise DataError("row has no 'answer'; columns: " + ", ".join(row), where=where)
        items.append(ChoiceItem(question, choices, _answer_index(row["answer"], choices, where)))
    return items


@dataclass
class ChoiceExample:
    prompt_ids: list[int]
    choice_ids: list[list[int]]  # one reply per choice, end-of-turn token included
    answer: int


def tokenize_choices(items: list[ChoiceItem], tokenizer: Any) -> list[ChoiceExample]:
    """Render each question once with the chat template and each choice as the reply to it."""
    rendered = [
        render_responses(
            [{"role": "user", "content": it.question}],
            [[{"role": "assistant", "content": c}] for c in it.choices],
            tokenizer,
        )
        for it in items
    ]
    ids = encode_responses(rendered, tokenizer)
    return [ChoiceExample(row[0], row[1:], it.answer) for it, row in zip(items, ids, strict=True)]


class ChoiceScores(NamedTuple):
    logps: list[Tensor]  # per question: (C,) summed log-prob of each choice
    tokens: list[Tensor]  # per question: (C,) tokens of each choice


@torch.no_grad()
def choice_logps(
    module: nn.Module, examples: list[ChoiceExample], pad_id: int, batch_size: int = 8
) -> ChoiceScores:
    """Score every choice of every question; `module` is a LogpsModel.

    A batch holds every choice row of `batch_size` questions: (sum of C, T) rows of prompt +
    choice, one segment per row.
    """
    device = next(module.parameters()).device
    logps: list[Tensor] = []
    tokens: list[Tensor] = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        rows = [(ex.prompt_ids, c) for ex in chunk for c in ex.choice_ids]
        batch = collate_rows(rows, pad_id)
        out = module(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            position_ids=batch["position_ids"].to(device),
            pred_rows=batch["pred_rows"].to(device),
            pred_cols=batch["pred_cols"].to(device),
            target_ids=batch["target_ids"].to(device),
            segment=batch["segment"].to(device),
            num_segments=len(rows),
        )
        sizes = [len(ex.choice_ids) for ex in chunk]
        logps.extend(out.seq_logps.float().cpu().split(sizes))  # (C,) per question
        tokens.extend(out.seq_tokens.float().cpu().split(sizes))
    return ChoiceScores(logps, tokens)


class ChoiceAccuracy(NamedTuple):
    accuracy: float  # argmax of summed log-prob is the answer
    accuracy_norm: float  # argmax of log-prob per token is the answer
    n: int


def choice_accuracy(scores: ChoiceScores, answers: list[int]) -> ChoiceAccuracy:
    """Ties go to the first choice (argmax), so a model indifferent to the choices is not lucky."""
    hit = hit_norm = 0
    for lp, tok, ans in zip(scores.logps, scores.tokens, answers, strict=True):
        hit += int(lp.argmax()) == ans
        hit_norm += int((lp / tok.clamp(min=1)).argmax()) == ans
    n = len(answers)
    return ChoiceAccuracy(hit / n if n else 0.0, hit_norm / n if n else 0.0, n)
