"""Rows to score with a reward model: a prompt and the response that answers it.

Accepted rows: ``prompt`` with ``completion`` or ``response`` (the prompt a string or a list of
messages), or ``messages`` (role/content turns) ending with the assistant turn to score. A row
that fits none of these is a :class:`DataError` naming its file and line.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from alignkit.data.io import read_located
from alignkit.errors import DataError

_HINT = (
    "each row needs prompt + completion (or response), or messages ending with an assistant turn"
)


class ScoreRows(NamedTuple):
    prompts: list[str | list[dict[str, str]]]
    responses: list[str]
    records: list[dict[str, Any]]
    locations: list[str]


def _messages(value: Any, what: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"'{what}' must be a non-empty list of messages", hint=_HINT)
    for m in value:
        ok = isinstance(m, dict) and isinstance(m.get("role"), str)
        if not ok or not isinstance(m.get("content"), str):
            raise DataError(f"'{what}' holds a turn without string role/content: {m!r}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def score_row(record: dict[str, Any]) -> tuple[str | list[dict[str, str]], str]:
    """(prompt, response) of one row."""
    if "messages" in record:
        turns = _messages(record["messages"], "messages")
        if turns[-1]["role"] != "assistant" or len(turns) < 2:
            raise DataError(
                "'messages' must end with the assistant turn to score, after a prompt",
                hint=_HINT,
            )
        return turns[:-1], turns[-1]["content"]
    key = next((k for k in ("completion", "response") if k in record), None)
    if "prompt" not in record or key is None:
        raise DataError(f"row has columns {', '.join(record) or '(none)'}", hint=_HINT)
    prompt, response = record["prompt"], record[key]
    if not isinstance(response, str):
        raise DataError(f"'{key}' must be a string, got {type(response).__name__}", hint=_HINT)
    if isinstance(prompt, str):
        return prompt, response
    return _messages(prompt, "prompt"), response


def read_score_rows(source: str) -> ScoreRows:
    """Every row of `source` as a prompt/response; errors name the row's file and line."""
    located = read_located(source)
    prompts, responses = [], []
    for record, where in zip(located.records, located.locations, strict=True):
        try:
            prompt, response = score_row(record)
        except DataError as err:
            raise DataError(err.message, where=where, hint=err.hint) from None
        prompts.append(prompt)
        responses.append(response)
    return ScoreRows(prompts, responses, located.records, located.locations)


def score_summary(scores: Any) -> dict[str, float]:
    """count, mean, std (population), min, max of a (N,) tensor of scores."""
    s = scores.double()
    return {
        "count": int(s.numel()),
        "mean": s.mean().item(),
        "std": s.std(correction=0).item(),
        "min": s.min().item(),
        "max": s.max().item(),
    }


def write_scores(path: str, rows: ScoreRows, scores: Any) -> None:
    """One JSON line per input row: the row's fields plus its `score`."""
    import json
    from pathlib import Path

    lines = [
        json.dumps({**record, "score": float(s)}, ensure_ascii=False)
        for record, s in zip(rows.records, scores.tolist(), strict=True)
    ]
    try:
        Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot write the scores: {exc.strerror}", where=path) from None
