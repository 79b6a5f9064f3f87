"""Preference and KTO rows as canonical pairs: prompt/chosen/rejected, implicit prompts, raw HH.

A :class:`Pair` is ``prompt`` (messages, ending with the user turn being answered) plus ``chosen``
and ``rejected`` (the assistant messages that answer it, usually one each). Sources:

- ``preference`` rows with a ``prompt`` (a string or messages) and ``chosen``/``rejected`` (strings,
  or message lists that either hold only the reply or repeat the prompt first, as UltraFeedback
  does), or rows with only ``chosen``/``rejected`` full conversations (implicit prompt: their
  longest common message prefix);
- ``hh``: raw HH-RLHF transcripts (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``), parsed into turns.
  Content is stripped, and consecutive turns of one speaker are merged: HH holds transcripts where
  "Human:" appears inline without its blank line, so the next "Assistant:" continues the same turn.

A pair whose chosen and rejected differ *before* their final replies answers two different
conversations and compares nothing: :class:`PromptMismatch`, which loading counts and drops, while
any other malformed row is a :class:`DataError` (the loader adds its file and line).

KTO rows (prompt/completion/label) become :class:`Unpaired`; a pair becomes two of them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from alignkit.data.formats import FORMAT_COLUMNS, as_turns, check_format_name, validate_messages
from alignkit.errors import DataError

Message = dict[str, str]


@dataclass
class Pair:
    prompt: list[Message]
    chosen: list[Message]  # assistant messages only
    rejected: list[Message]


@dataclass
class Unpaired:
    """A KTO row: one completion and whether it is desirable."""

    prompt: list[Message]
    completion: list[Message]
    desirable: bool


class PromptMismatch(DataError):
    """Chosen and rejected differ before their final replies: they answer different prompts."""


# ---------------------------------------------------------------------------------------------
# Conversion


def _check_columns(record: dict[str, Any], fmt: str, needed: tuple[str, ...]) -> None:
    missing = [c for c in needed if c not in record or record[c] is None]
    if missing:
        raise DataError(
            f"row has no '{missing[0]}' column (format '{fmt}'); columns: {', '.join(record)}",
            hint=f"every {fmt} row needs {', '.join(needed)}; rename columns with "
            "data.column_map (e.g. {response_a: chosen, response_b: rejected}) or remove the row",
        )


def to_pair(record: dict[str, Any], fmt: str) -> Pair:
    """One column-mapped row of format 'preference' or 'hh' as a canonical :class:`Pair`."""
    if fmt == "hh":
        _check_columns(record, fmt, ("chosen", "rejected"))
        chosen = parse_hh(_hh_text(record["chosen"], "chosen"))
        rejected = parse_hh(_hh_text(record["rejected"], "rejected"))
        return split_implicit(chosen, rejected)
    if fmt != "preference":
        check_format_name(fmt)
        raise DataError(
            f"format '{fmt}' holds no preference pairs",
            hint="pairs need chosen and rejected replies: prompt/chosen/rejected or HH transcripts",
        )
    _check_columns(record, fmt, ("chosen", "rejected"))
    chosen = as_turns(record["chosen"], "assistant", "chosen")
    rejected = as_turns(record["rejected"], "assistant", "rejected")
    if record.get("prompt") is None:
        if isinstance(record["chosen"], str):
            raise DataError(
                "row has chosen/rejected text but no 'prompt' column",
                hint="add the prompt, map it with data.column_map, or give chosen/rejected as "
                "whole conversations (their shared beginning is the prompt)",
            )
        return split_implicit(chosen, rejected)
    prompt = as_turns(record["prompt"], "user", "prompt")
    if isinstance(record.get("system"), str) and prompt and prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": record["system"]})
    return _explicit(prompt, chosen, rejected)


def _explicit(prompt: list[Message], chosen: list[Message], rejected: list[Message]) -> Pair:
    """An explicit prompt; chosen/rejected may repeat it before their replies (UltraFeedback)."""
    own_c, resp_c = _split_reply(chosen, "chosen")
    own_r, resp_r = _split_reply(rejected, "rejected")
    for own in (own_c, own_r):
        if own and own != prompt:
            raise PromptMismatch(
                "the chosen or rejected conversation starts with turns that differ from the "
                "prompt column: the pair does not answer one prompt",
                hint="give chosen/rejected as the replies only, or repeat the prompt exactly",
            )
    return _checked(Pair(prompt, resp_c, resp_r))


def _split_reply(conv: list[Message], what: str) -> tuple[list[Message], list[Message]]:
    """(turns before the final assistant run, the final assistant run)."""
    start = _reply_start(conv)
    if start == len(conv):
        raise DataError(
            f"the {what} conversation ends with a "
            f"'{conv[-1]['role'] if conv else 'nothing'}' turn, not an assistant reply"
        )
    return conv[:start], conv[start:]


def _reply_start(conv: list[Message]) -> int:
    """Index where the trailing run of assistant messages begins."""
    k = len(conv)
    while k > 0 and conv[k - 1]["role"] == "assistant":
        k -= 1
    return k


def split_implicit(chosen: list[Message], rejected: list[Message]) -> Pair:
    """Two full conversations -> prompt = their longest common message prefix, replies = the rest.

    The prompt stops where the final assistant replies begin, so identical conversations give a
    pair with chosen == rejected (reported by preflight), not an error.
    """
    common = 0
    while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
        common += 1
    start_c, start_r = _reply_start(chosen), _reply_start(rejected)
    k = min(common, start_c, start_r)
    if min(start_c, start_r) == 0:
        raise DataError(
            "a chosen or rejected conversation has no user turn before its reply, so there is "
            "no prompt to share",
            hint="give whole conversations, or a prompt column with the replies",
        )
    if not (k == start_c == start_r):
        raise PromptMismatch(
            f"chosen and rejected differ at message {k}, before their final replies: the pair "
            "answers two different conversations",
            hint="such rows are dropped and counted; fix them upstream to keep them",
        )
    return _checked(Pair(chosen[:k], chosen[k:], rejected[k:]))


def _checked(pair: Pair, names: tuple[str, str] = ("chosen", "rejected")) -> Pair:
    for name, reply in zip(names, (pair.chosen, pair.rejected), strict=True):
        if not reply or any(m["role"] != "assistant" for m in reply):
            raise DataError(f"'{name}' must be one or more assistant messages (the reply only)")
        validate_messages(pair.prompt + reply)
    if pair.prompt[-1]["role"] != "user":
        raise DataError(
            f"the prompt ends with a '{pair.prompt[-1]['role']}' turn",
            hint="the prompt is the conversation up to the user turn the replies answer",
        )
    return pair


_HH_TURN = re.compile(r"(?:\A|\n\n)(Human|Assistant):")


def _hh_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"'{what}' must be an HH transcript string, got {type(value).__name__}")
    return value


def parse_hh(text: str) -> list[Message]:
    """An HH transcript -> messages: content stripped, consecutive same-speaker turns merged."""
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise DataError(
            f"not an HH transcript: it must start with '\\n\\nHuman:' (starts {text[:40]!r})",
            hint="raw HH-RLHF rows are whole transcripts of '\\n\\nHuman: ' and "
            "'\\n\\nAssistant: ' turns",
        )
    messages: list[Message] = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        role = "user" if speaker == "Human" else "assistant"
        content = content.strip()
        if messages and messages[-1]["role"] == role:
            # "...  Human: more\n\nAssistant: ..." has no turn break before "Human:": one turn.
            joined = [c for c in (messages[-1]["content"], content) if c]
            messages[-1]["content"] = "\n\n".join(joined)
        else:
            messages.append({"role": role, "content": content})
    return messages


def to_unpaired(record: dict[str, Any]) -> Unpaired:
    """A KTO row (prompt/completion/label). The label must be a boolean.

    Strings ("true", "yes") and numbers (0/1, or a 1-5 rating) are refused rather than guessed:
    "0" may mean bad or be a class index, a rating needs a threshold. CSV cannot hold booleans,
    so KTO data comes as JSONL, JSON or Parquet.
    """
    _check_columns(record, "kto", FORMAT_COLUMNS["kto"])
    label = record["label"]
    if not isinstance(label, bool):
        raise DataError(
            f"label must be true or false (a JSON boolean), got {type(label).__name__} {label!r}",
            hint="write labels as true/false (desirable/undesirable); strings and numbers are not "
            "guessed at, and CSV cannot hold booleans: convert the file to JSONL or Parquet",
        )
    prompt = as_turns(record["prompt"], "user", "prompt")
    completion = as_turns(record["completion"], "assistant", "completion")
    pair = _checked(Pair(prompt, completion, completion), ("completion", "completion"))
    return Unpaired(pair.prompt, pair.chosen, label)


def pair_to_unpaired(pair: Pair) -> list[Unpaired]:
    """A pair made unpaired for KTO: the chosen reply desirable, the rejected one not."""
    return [Unpaired(pair.prompt, pair.chosen, True), Unpaired(pair.prompt, pair.rejected, False)]


def pair_key(pair: Pair) -> str:
    """A stable text key (duplicates, caching)."""
    return json.dumps([pair.prompt, pair.chosen, pair.rejected], sort_keys=True, ensure_ascii=False)
