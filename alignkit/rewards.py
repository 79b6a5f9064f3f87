"""Built-in verifiable rewards, usable as `ppo.reward_fn: alignkit.rewards:NAME`.

A reward function is called once per rollout batch as
``fn(prompts: list[str], responses: list[str], examples: list[dict]) -> sequence of floats``:
``prompts`` are the last user messages, ``responses`` the decoded replies, and ``examples`` the raw
data rows (before the column map), so a verifiable reward can read the gold answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# GSM8K's convention: the final answer follows "####" at the end of the solution.
_FINAL = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


def final_answer(text: str) -> float | None:
    """The number after the last '####' in `text`, or None."""
    found = _FINAL.findall(text or "")
    return _number(found[-1]) if found else None


def gsm8k_answer(
    prompts: Sequence[str], responses: Sequence[str], examples: Sequence[dict]
) -> list[float]:
    """1.0 when the number after the response's '####' equals the gold answer's, else 0.0.

    The gold answer is the row's `answer` column (GSM8K's "...reasoning...\\n#### 72").
    """
    out = []
    for response, row in zip(responses, examples, strict=True):
        gold = final_answer(str(row.get("answer", "")))
        got = final_answer(response)
        out.append(1.0 if gold is not None and got is not None and abs(got - gold) < 1e-6 else 0.0)
    return out


def gsm8k_format(
    prompts: Sequence[str], responses: Sequence[str], examples: Sequence[dict]
) -> list[float]:
    """1.0 when the response states a final answer as '#### <number>', else 0.0."""
    return [1.0 if final_answer(r) is not None else 0.0 for r in responses]


def response_length(
    prompts: Sequence[str], responses: Sequence[str], examples: Sequence[dict]
) -> list[float]:
    """Words in the response divided by 100: a toy reward that is easy to raise, for tests
    and for watching the reward-hacking signature (reward rising with length)."""
    return [len(r.split()) / 100.0 for r in responses]
