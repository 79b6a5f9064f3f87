"""Side-by-side samples: the same prompts answered by the reference and by the model, to read.

Numbers say whether a model changed; reading a few answers says how. Generation is greedy, so
the samples are reproducible and the two columns differ only because the models do.
"""

from __future__ import annotations

import json
from typing import Any

from alignkit.errors import DataError

# A prompt string, or a conversation (system and earlier turns) whose last turn is answered
Prompt = str | list[dict[str, str]]

PROMPT_FIELDS = ("prompt", "question", "instruction")


def prompt_of(row: dict[str, Any]) -> Prompt | None:
    """A row's prompt: a prompt/question/instruction string, or a conversational prompt kept
    whole (system and earlier turns are part of what the answer responds to); None when the row
    has none."""
    for name in PROMPT_FIELDS:
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, list) and _is_conversation(value):
            return [{"role": m["role"], "content": m["content"]} for m in value]
    return None


def _is_conversation(value: list) -> bool:
    """Messages with string roles and contents, at least one of them from the user."""
    if not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    ):
        return False
    return any(m["role"] == "user" for m in value)


def prompt_key(prompt: Prompt) -> str:
    """A hashable key of a prompt, for caches and de-duplication."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)


def prompt_text(prompt: Prompt) -> str:
    """A prompt as plain text: a conversation as one "role: content" paragraph per turn."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def prompt_title(prompt: Prompt) -> str:
    """A one-line title: the prompt, or a conversation's last turn after its number of turns."""
    if isinstance(prompt, str):
        return prompt
    return f"({len(prompt)} turns) {prompt[-1]['content']}"


def unique_prompts(prompts: list[Prompt]) -> list[Prompt]:
    """The prompts without repeats, in first-seen order."""
    seen: dict[str, Prompt] = {}
    for p in prompts:
        seen.setdefault(prompt_key(p), p)
    return list(seen.values())


def prompts_from_rows(rows: list[dict[str, Any]], where: str) -> list[Prompt]:
    """Every row's prompt; a DataError naming the columns when the rows hold none."""
    prompts = [p for p in map(prompt_of, rows) if p is not None]
    if not prompts:
        cols = sorted({k for r in rows for k in r})
        raise DataError(
            f"no prompts found (columns: {', '.join(cols)})",
            where=where,
            hint=f"samples and win rate read a text column named {' / '.join(PROMPT_FIELDS)}",
        )
    return prompts


def side_by_side(
    prompts: list[Prompt], reference: list[str] | None, model: list[str]
) -> list[dict[str, Any]]:
    """[{"prompt", "reference", "model"}] rows; reference is None when there is no reference."""
    refs: list[str | None] = list(reference) if reference is not None else [None] * len(prompts)
    return [
        {"prompt": p, "reference": r, "model": m}
        for p, r, m in zip(prompts, refs, model, strict=True)
    ]
