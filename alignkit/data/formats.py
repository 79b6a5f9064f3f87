"""Data formats: detect which one a file uses and convert rows to the canonical form.

The canonical form of a training row is a list of messages ``[{"role", "content"}]`` with roles
system, user and assistant, or ``{"text": ...}`` for plain language-model text. Preference,
HH-RLHF, KTO and prompt-only rows are detected and named here too, so a method that cannot use
them (SFT) can say so instead of failing on a missing column.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from alignkit.errors import DataError

ROLES = ("system", "user", "assistant")

# Required columns per format, in detection priority: the more specific formats come first
# (prompt/completion/label is KTO before it is prompt/completion).
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "preference": ("prompt", "chosen", "rejected"),
    "hh": ("chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
    "prompt_only": ("prompt",),
}
FORMATS = tuple(FORMAT_COLUMNS)
SFT_FORMATS = ("prompt_completion", "messages", "alpaca", "sharegpt", "text")

_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
}
_DETECT_SAMPLE = 200


def apply_column_map(record: dict[str, Any], column_map: dict[str, str] | None) -> dict[str, Any]:
    """Rename fields: ``{"question": "prompt"}`` turns a ``question`` column into ``prompt``."""
    if not column_map:
        return record
    out = {k: v for k, v in record.items() if k not in column_map}
    for src, dst in column_map.items():
        if src in record:
            out[dst] = record[src]
    return out


def _conversation_key(record: dict[str, Any]) -> str | None:
    """'messages' or 'conversations' when the row holds a list of turns, else None."""
    for key in ("messages", "conversations"):
        turns = record.get(key)
        if isinstance(turns, list) and turns and isinstance(turns[0], dict):
            return key
    return None


def _row_format(record: dict[str, Any]) -> str | None:
    key = _conversation_key(record)
    if key is not None:
        # The turn fields decide, not the column name: many "conversations" are role/content.
        return "sharegpt" if "from" in record[key][0] else "messages"
    for fmt, cols in FORMAT_COLUMNS.items():
        if fmt in ("messages", "sharegpt"):
            continue
        if all(c in record for c in cols):
            if fmt == "hh" and not _is_hh_transcript(record["chosen"]):
                return "preference"  # implicit-prompt pairs: prompt shared inside chosen/rejected
            return fmt
    return None


def _is_hh_transcript(value: Any) -> bool:
    return isinstance(value, str) and "Human:" in value and "Assistant:" in value


def detect_format(records: list[dict[str, Any]], column_map: dict[str, str] | None = None) -> str:
    """Name the format most sampled rows match; DataError listing columns when none does."""
    if not records:
        raise DataError("no rows to detect a format from")
    sample = [apply_column_map(r, column_map) for r in records[:_DETECT_SAMPLE]]
    votes = Counter(f for f in map(_row_format, sample) if f is not None)
    if votes:
        best = max(votes.values())
        return next(f for f in FORMATS if votes.get(f) == best)
    found: Counter[str] = Counter()
    for row in sample:
        found.update(row.keys())
    raise DataError(
        f"the columns match no known format; found columns: {', '.join(sorted(found))}",
        hint=_expectations() + "; rename columns with data.column_map, e.g. "
        "{question: prompt, answer: completion}",
    )


def _expectations() -> str:
    parts = [f"{fmt} needs {'/'.join(cols)}" for fmt, cols in FORMAT_COLUMNS.items()]
    return "formats: " + "; ".join(parts)


def check_format_name(fmt: str) -> str:
    if fmt not in FORMATS:
        raise DataError(
            f"unknown data format '{fmt}'",
            hint=f"data.format is 'auto' or one of: {', '.join(FORMATS)}",
        )
    return fmt


def to_messages(record: dict[str, Any], fmt: str) -> list[dict[str, str]] | dict[str, str]:
    """Convert one (column-mapped) row to canonical messages, or ``{"text": ...}``."""
    converters = {
        "prompt_completion": _from_prompt_completion,
        "messages": _from_messages,
        "alpaca": _from_alpaca,
        "sharegpt": _from_sharegpt,
        "text": _from_text,
    }
    if fmt not in converters:
        check_format_name(fmt)
        raise DataError(
            f"format '{fmt}' cannot be converted to a training conversation",
            hint=f"supervised fine-tuning reads {', '.join(SFT_FORMATS)}",
        )
    missing = [c for c in FORMAT_COLUMNS[fmt] if c not in record]
    if fmt == "messages" and _conversation_key(record):
        missing = []
    if missing:
        raise DataError(
            f"row has no '{missing[0]}' column (format '{fmt}'); columns: {', '.join(record)}",
            hint="every row must have the same columns; rename with data.column_map",
        )
    return converters[fmt](record)


def _text_of(value: Any, what: str) -> str:
    """A message content: a string, or OpenAI-style text parts joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        texts = [p.get("text") for p in value]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)  # type: ignore[arg-type]
    raise DataError(f"{what} must be a string, got {type(value).__name__}")


def as_turns(value: Any, default_role: str, what: str) -> list[dict[str, str]]:
    """A prompt or completion: a plain string, or itself a list of messages."""
    if isinstance(value, list):
        return parse_turns(value)
    return [{"role": default_role, "content": _text_of(value, what)}]


def _from_prompt_completion(record: dict[str, Any]) -> list[dict[str, str]]:
    messages = as_turns(record["prompt"], "user", "prompt")
    completion = as_turns(record["completion"], "assistant", "completion")
    if not any(m["role"] == "assistant" for m in completion):
        raise DataError("the completion holds no assistant message")
    if isinstance(record.get("system"), str) and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": record["system"]})
    return validate_messages(messages + completion)


def _from_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    return validate_messages(parse_turns(record.get("messages", record.get("conversations"))))


def parse_turns(turns: Any) -> list[dict[str, str]]:
    """role/content turns, unvalidated (a prompt or completion is only part of a conversation)."""
    if not isinstance(turns, list):
        raise DataError(f"'messages' must be a list of turns, got {type(turns).__name__}")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise DataError(f"message {i} must be an object with 'role' and 'content'")
        out.append({"role": turn["role"], "content": _text_of(turn["content"], f"message {i}")})
    return out


def _from_sharegpt(record: dict[str, Any]) -> list[dict[str, str]]:
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise DataError(f"'conversations' must be a list of turns, got {type(turns).__name__}")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"turn {i} must be an object with 'from' and 'value'")
        speaker = turn.get("from", turn.get("role"))
        role = _SHAREGPT_ROLES.get(str(speaker).lower())
        if role is None:
            raise DataError(
                f"turn {i} is from '{speaker}'",
                hint=f"sharegpt speakers are {', '.join(_SHAREGPT_ROLES)}",
            )
        out.append(
            {"role": role, "content": _text_of(turn.get("value", turn.get("content")), f"turn {i}")}
        )
    if isinstance(record.get("system"), str) and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": record["system"]})
    return validate_messages(out)


def _from_alpaca(record: dict[str, Any]) -> list[dict[str, str]]:
    instruction = _text_of(record["instruction"], "instruction")
    extra = record.get("input")
    user = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
    messages = [{"role": "user", "content": user}]
    if isinstance(record.get("system"), str) and record["system"].strip():
        messages.insert(0, {"role": "system", "content": record["system"]})
    messages.append({"role": "assistant", "content": _text_of(record["output"], "output")})
    return validate_messages(messages)


def _from_text(record: dict[str, Any]) -> dict[str, str]:
    return {"text": _text_of(record["text"], "text")}


def validate_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Check roles and order: system only first, a user turn before the first reply."""
    if not messages:
        raise DataError("the conversation is empty")
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise DataError(
                f"message {i} has role '{m['role']}'",
                hint=f"roles must be one of {', '.join(ROLES)}",
            )
        if m["role"] == "system" and i > 0:
            raise DataError(f"message {i} is a system message; only the first may be")
    body = [m["role"] for m in messages if m["role"] != "system"]
    if "assistant" not in body:
        raise DataError("the conversation has no assistant turn to learn from")
    if body[0] != "user":
        raise DataError(
            "the conversation starts with an assistant turn",
            hint="the first turn after the system prompt must be the user's",
        )
    return messages
