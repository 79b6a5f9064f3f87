"""Prompts for PPO rollouts: read any format that holds a prompt, render it, bound its length.

Accepted rows: prompt-only (`prompt`, a string or messages), prompt/completion and KTO rows (the
prompt), preference pairs and raw HH transcripts (the pair's shared prompt), and `messages`
conversations (up to their last user turn). Other field names map on with `data.column_map`
(GSM8K: `{question: prompt}`). The raw row is kept so a reward function can read, for example,
the gold answer.

Length: the prompt must leave room for `ppo.max_new_tokens` within `data.max_length`; longer
prompts are dropped and counted, cut on their left side, or an error naming the row, as
`data.truncation` says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from alignkit.config import RunConfig
from alignkit.data.formats import apply_column_map, as_turns, detect_format, parse_turns
from alignkit.data.io import LocatedRecords, read_located
from alignkit.data.pair_formats import PromptMismatch, to_pair
from alignkit.data.templates import render_messages, resolve_template
from alignkit.data.tokenize import heldout_indices, subset, with_where
from alignkit.errors import ConfigError, DataError

Message = dict[str, str]
PROMPT_FORMATS = ("prompt_only", "prompt_completion", "kto", "preference", "hh", "messages")


@dataclass
class PromptExample:
    messages: list[Message]  # the conversation so far, ending with the user turn to answer
    prompt_ids: list[int]  # rendered with the generation prompt, possibly left-truncated
    row: dict[str, Any]  # the raw data row, as read from the file

    @property
    def text(self) -> str:
        """The user message being answered (what a reward function receives as the prompt)."""
        return self.messages[-1]["content"]


@dataclass
class PromptStats:
    rows_read: int = 0
    kept: int = 0  # includes truncated
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_prompt_mismatch: int = 0


@dataclass
class PromptData:
    train: list[PromptExample]
    eval: list[PromptExample]
    format: str
    stats: PromptStats
    eval_stats: PromptStats = field(default_factory=PromptStats)


def prompt_messages(row: dict[str, Any], fmt: str) -> list[Message]:
    """The prompt of one column-mapped row as messages ending with a user turn."""
    if fmt in ("preference", "hh"):
        messages = to_pair(row, fmt).prompt
    elif fmt == "messages":
        messages = parse_turns(row.get("messages", row.get("conversations")))
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # the prompt is everything before the final reply
    elif fmt in ("prompt_only", "prompt_completion", "kto"):
        if row.get("prompt") is None:
            raise DataError("row has no 'prompt'", hint="rename the column with data.column_map")
        messages = as_turns(row["prompt"], "user", "prompt")
        if isinstance(row.get("system"), str) and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": row["system"]})
    else:
        raise DataError(
            f"format '{fmt}' holds no prompts for PPO",
            hint="give rows a 'prompt' column (data.column_map {question: prompt}), messages "
            "ending with a user turn, or preference pairs",
        )
    if not messages or messages[-1]["role"] != "user":
        raise DataError("the prompt does not end with a user turn for the policy to answer")
    return messages


def prompt_limit(cfg: RunConfig) -> int:
    """Most prompt tokens allowed: what `data.max_length` leaves after the response."""
    return prompt_budget(cfg.data.max_length, cfg.ppo.max_new_tokens)


def prompt_budget(max_length: int, max_new_tokens: int) -> int:
    """`max_length - max_new_tokens`; ConfigError when that leaves no room for a prompt."""
    limit = max_length - max_new_tokens
    if limit < 1:
        raise ConfigError(
            f"data.max_length={max_length} leaves no room for a prompt after "
            f"ppo.max_new_tokens={max_new_tokens}",
            hint="raise data.max_length or lower ppo.max_new_tokens",
        )
    return limit


def fit_prompt_ids(ids: list[int], limit: int, truncation: str, where: str) -> list[int] | None:
    """Apply the truncation policy to one prompt; None when it is dropped."""
    if len(ids) <= limit:
        return ids
    if truncation == "error":
        raise DataError(
            f"prompt is {len(ids)} tokens, more than the {limit} that data.max_length leaves "
            "after ppo.max_new_tokens",
            where=where,
            hint="raise data.max_length, or set data.truncation to drop or truncate",
        )
    return ids[-limit:] if truncation == "truncate" else None


def build_prompts(
    located: LocatedRecords, fmt: str, cfg: RunConfig, tokenizer: Any
) -> tuple[list[PromptExample], PromptStats]:
    stats = PromptStats(rows_read=len(located))
    template = resolve_template(tokenizer, cfg.model.chat_template)
    system = cfg.ppo.system_prompt
    kept: list[tuple[list[Message], dict, str]] = []
    for record, where in zip(located.records, located.locations, strict=True):
        try:
            messages = prompt_messages(apply_column_map(record, cfg.data.column_map), fmt)
        except PromptMismatch:
            stats.dropped_prompt_mismatch += 1
            continue
        except DataError as err:
            raise with_where(err, where) from None
        if system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        kept.append((messages, record, where))
    texts = []
    for messages, _, where in kept:
        try:
            texts.append(render_messages(tokenizer, messages, template, generation_prompt=True))
        except DataError as err:
            raise with_where(err, where) from None
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    limit = prompt_limit(cfg)
    out = []
    for (messages, record, where), row_ids in zip(kept, ids, strict=True):
        fitted = fit_prompt_ids(list(row_ids), limit, cfg.data.truncation, where)
        if fitted is None:
            stats.dropped_too_long += 1
            continue
        stats.kept += 1
        stats.truncated += len(fitted) < len(row_ids)
        out.append(PromptExample(messages, fitted, record))
    return out, stats


def _format(located: LocatedRecords, cfg: RunConfig, source: str) -> str:
    try:
        auto = cfg.data.format == "auto"
        fmt = detect_format(located.records, cfg.data.column_map) if auto else cfg.data.format
    except DataError as err:
        raise with_where(err, source) from None
    if fmt not in PROMPT_FORMATS:
        raise DataError(
            f"format '{fmt}' holds no prompts for PPO",
            where=source,
            hint=f"PPO reads {', '.join(PROMPT_FORMATS)} rows; map a column onto 'prompt' "
            "with data.column_map (e.g. {question: prompt})",
        )
    return fmt


def load_prompt_data(cfg: RunConfig, tokenizer: Any) -> PromptData:
    """Train and held-out prompts from `cfg.data`, with what the length policy did."""
    dcfg = cfg.data
    if not dcfg.train:
        raise DataError("data.train is not set", hint="set data.train to a file of prompts")
    located = read_located(dcfg.train, split=dcfg.split, limit=dcfg.limit)
    fmt = _format(located, cfg, dcfg.train)
    if dcfg.eval:
        eval_located = read_located(dcfg.eval, split=dcfg.split)
        eval_fmt = _format(eval_located, cfg, dcfg.eval)
    else:
        held = set(heldout_indices(len(located), dcfg, cfg.train.seed))
        eval_located = subset(located, sorted(held))
        located = subset(located, [i for i in range(len(located)) if i not in held])
        eval_fmt = fmt
    train, stats = build_prompts(located, fmt, cfg, tokenizer)
    if not train:
        raise DataError(
            f"no training prompts left of {stats.rows_read} rows: {stats.dropped_too_long} "
            f"longer than the {prompt_limit(cfg)} tokens data.max_length leaves after "
            "ppo.max_new_tokens",
            hint="raise data.max_length, lower ppo.max_new_tokens, or set data.truncation=truncate",
        )
    evals, eval_stats = [], PromptStats()
    if len(eval_located):
        evals, eval_stats = build_prompts(eval_located, eval_fmt, cfg, tokenizer)
    return PromptData(train, evals, fmt, stats, eval_stats)
