"""Side-by-side samples: the same prompts answered by the reference and by the model, to read.

Numbers say whether a model changed; reading a few answers says how. Generation is greedy, so
the samples are reproducible and the two columns differ only because the models do.
"""

from __future__ import annotations

from typing import Any

from alignkit.errors import DataError

PROMPT_FIELDS = ("prompt", "question", "instruction")


def prompt_of(row: dict[str, Any]) -> str | None:
    """A row's prompt as plain text: a prompt/question/instruction string, or the last user
    message of a conversational prompt; None when the row has none."""
    for name in PROMPT_FIELDS:
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, list):
            users = [
                m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"
            ]
            if users and isinstance(users[-1], str):
                return users[-1]
    return None


def prompts_from_rows(rows: list[dict[str, Any]], where: str) -> list[str]:
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
    prompts: list[str], reference: list[str] | None, model: list[str]
) -> list[dict[str, str | None]]:
    """[{"prompt", "reference", "model"}] rows; reference is None when there is no reference."""
    refs: list[str | None] = list(reference) if reference is not None else [None] * len(prompts)
    return [
        {"prompt": p, "reference": r, "model": m}
        for p, r, m in zip(prompts, refs, model, strict=True)
    ]
