"""Tokenize SFT rows with exact label masks, apply the truncation policy, build train/eval sets.

Labels come from the character spans of :mod:`alignkit.data.templates` mapped onto tokens through
the fast tokenizer's offsets: a token is trained when its characters overlap an assistant span.
Searching token ids for role markers instead breaks as soon as BPE merges a marker with its
neighbours; offsets do not.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from alignkit.config import DataConfig
from alignkit.data.formats import (
    SFT_FORMATS,
    apply_column_map,
    check_format_name,
    detect_format,
    to_messages,
)
from alignkit.data.io import LocatedRecords, read_located
from alignkit.data.templates import Rendered, render_conversation, render_text
from alignkit.errors import DataError

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
TOKENIZE_CHUNK = 512  # rows per call to the fast tokenizer (it batches in Rust)

Outcome = Literal["kept", "truncated", "too_long", "no_target"]


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class Encoded:
    """A whole (untruncated) row: ids, labels, and where its final response starts."""

    input_ids: list[int]
    labels: list[int]
    offsets: list[tuple[int, int]]
    response_start: int  # token index of the last assistant span (the one truncation keeps)

    @property
    def prompt_len(self) -> int:
        return self.response_start

    @property
    def response_len(self) -> int:
        return len(self.input_ids) - self.response_start


@dataclass
class Fitted:
    example: TokenizedExample | None
    outcome: Outcome


@dataclass
class TokenStats:
    rows_read: int = 0
    kept: int = 0  # includes the truncated rows
    dropped_too_long: int = 0
    truncated: int = 0
    dropped_no_target: int = 0

    def add(self, outcome: Outcome) -> None:
        if outcome in ("kept", "truncated"):
            self.kept += 1
        if outcome == "truncated":
            self.truncated += 1
        elif outcome == "too_long":
            self.dropped_too_long += 1
        elif outcome == "no_target":
            self.dropped_no_target += 1


@dataclass
class SFTData:
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    format: str
    stats: TokenStats
    eval_stats: TokenStats = field(default_factory=TokenStats)


def require_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            "label masks need a fast tokenizer (character offsets); this one is slow",
            hint="load the tokenizer with use_fast=True (a tokenizer.json next to the model)",
        )


def encode_rendered(
    rendered: list[Rendered], tokenizer: Any, *, completion_only: bool = True
) -> list[Encoded]:
    """Tokenize rendered rows (no special tokens added: the template already has them)."""
    require_fast(tokenizer)
    out: list[Encoded] = []
    for start in range(0, len(rendered), TOKENIZE_CHUNK):
        chunk = rendered[start : start + TOKENIZE_CHUNK]
        enc = tokenizer(
            [r.text for r in chunk], add_special_tokens=False, return_offsets_mapping=True
        )
        for r, ids, offs in zip(chunk, enc["input_ids"], enc["offset_mapping"], strict=True):
            out.append(_label(r, list(ids), [tuple(o) for o in offs], completion_only))
    return out


def _label(
    r: Rendered, ids: list[int], offsets: list[tuple[int, int]], completion_only: bool
) -> Encoded:
    in_span = [False] * len(ids)
    span_first = []  # first token index of each span
    j = 0
    for s, e in r.spans:
        while j < len(ids) and offsets[j][1] <= s:
            j += 1
        span_first.append(j)
        k = j
        while k < len(ids) and offsets[k][0] < e:
            in_span[k] = True  # overlaps [s, e): offsets[k][1] > s holds from the loop above
            k += 1
    labels = [
        t if (m or not completion_only) else IGNORE_INDEX for t, m in zip(ids, in_span, strict=True)
    ]
    response_start = span_first[-1] if span_first else len(ids)
    return Encoded(ids, labels, offsets, min(response_start, len(ids)))


def fit_to_length(
    enc: Encoded,
    max_length: int,
    truncation: str,
    *,
    where: str | None = None,
) -> Fitted:
    """Apply the truncation policy to one encoded row.

    "truncate" cuts the prompt's left side first, keeping the last turns and the final response;
    only when the response alone is longer than `max_length` does it cut the response's right end
    (then no prompt is left, and the end-of-turn token is lost).
    """
    ids, labels, n = enc.input_ids, enc.labels, len(enc.input_ids)
    outcome: Outcome = "kept"
    if n > max_length:
        if truncation == "drop":
            return Fitted(None, "too_long")
        if truncation == "error":
            raise DataError(
                f"row is {n} tokens, longer than data.max_length={max_length}",
                where=where,
                hint="raise data.max_length, or set data.truncation to drop or truncate",
            )
        if truncation != "truncate":
            raise DataError(f"unknown truncation policy '{truncation}'")
        if enc.response_len <= max_length:
            window = slice(n - max_length, n)
        else:
            window = slice(enc.response_start, enc.response_start + max_length)
        ids, labels, outcome = ids[window], labels[window], "truncated"
    example = TokenizedExample(list(ids), list(labels))
    if example.num_targets == 0:
        return Fitted(None, "no_target")
    return Fitted(example, outcome)


def render_row(
    conversation: list[dict[str, str]] | dict[str, str] | str,
    tokenizer: Any,
    chat_template: str | None = None,
) -> Rendered:
    if isinstance(conversation, str):
        return render_text(conversation, tokenizer)
    if isinstance(conversation, dict):
        return render_text(conversation["text"], tokenizer)
    return render_conversation(conversation, tokenizer, chat_template)


def tokenize_sft(
    messages_or_text: list[dict[str, str]] | dict[str, str] | str,
    tokenizer: Any,
    *,
    max_length: int,
    truncation: str,
    completion_only: bool = True,
    chat_template: str | None = None,
    where: str | None = None,
) -> TokenizedExample | None:
    """One row to ids + labels; None when the policy drops it or nothing is left to learn."""
    rendered = render_row(messages_or_text, tokenizer, chat_template)
    (enc,) = encode_rendered([rendered], tokenizer, completion_only=completion_only)
    return fit_to_length(enc, max_length, truncation, where=where).example


def with_where(err: DataError, where: str) -> DataError:
    return DataError(err.message, where=err.where or where, hint=err.hint)


def convert_rows(
    located: LocatedRecords, fmt: str, cfg: DataConfig, tokenizer: Any, chat_template: str | None
) -> list[Rendered]:
    """Column-map, convert and render every row; the first bad row raises, named by location."""
    out = []
    for record, where in zip(located.records, located.locations, strict=True):
        try:
            conv = to_messages(apply_column_map(record, cfg.column_map), fmt)
            out.append(render_row(conv, tokenizer, chat_template))
        except DataError as err:
            raise with_where(err, where) from None
    return out


def resolve_format(records: list[dict], cfg: DataConfig, *, source: str) -> str:
    """cfg.format or the detected one; non-SFT formats are refused with what to do instead."""
    try:
        fmt = detect_format(records, cfg.column_map) if cfg.format == "auto" else cfg.format
        check_format_name(fmt)
    except DataError as err:
        raise with_where(err, source) from None
    if fmt not in SFT_FORMATS:
        mapping = {
            "preference": "to train on the chosen replies, map them: data.column_map "
            "{chosen: completion} (and drop rejected)",
            "kto": "to train on the rows labelled good, filter them into a prompt/completion file",
            "hh": "raw HH transcripts are preference pairs; use them with dpo",
            "prompt_only": "prompt-only rows have nothing to imitate; add a completion column",
        }
        raise DataError(
            f"format '{fmt}' is not supervised fine-tuning data",
            where=source,
            hint=f"SFT reads {', '.join(SFT_FORMATS)}; {mapping.get(fmt, '')}".rstrip("; "),
        )
    return fmt


def heldout_indices(n: int, cfg: DataConfig, seed: int) -> list[int]:
    """Rows of train held out for eval: a seeded shuffle, so the same seed gives the same split."""
    if cfg.eval_size:
        k = cfg.eval_size
    elif cfg.eval_fraction:
        k = max(1, round(n * cfg.eval_fraction))
    else:
        return []
    if k >= n:
        raise DataError(
            f"cannot hold out {k} of {n} rows for eval and still train",
            hint="lower data.eval_size / data.eval_fraction, or give data.eval a file",
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[:k])


def subset(located: LocatedRecords, keep: list[int]) -> LocatedRecords:
    return LocatedRecords([located.records[i] for i in keep], [located.locations[i] for i in keep])


class Built(NamedTuple):
    examples: list[TokenizedExample]
    stats: TokenStats
    encoded: list[Encoded]  # every row before the truncation policy, for error messages


def build_examples(
    located: LocatedRecords,
    fmt: str,
    cfg: DataConfig,
    tokenizer: Any,
    chat_template: str | None,
) -> Built:
    rendered = convert_rows(located, fmt, cfg, tokenizer, chat_template)
    encoded = encode_rendered(rendered, tokenizer, completion_only=cfg.completion_only)
    stats = TokenStats(rows_read=len(located))
    examples = []
    for enc, where in zip(encoded, located.locations, strict=True):
        fitted = fit_to_length(enc, cfg.max_length, cfg.truncation, where=where)
        stats.add(fitted.outcome)
        if fitted.example is not None:
            examples.append(fitted.example)
    return Built(examples, stats, encoded)


def load_sft_data(
    cfg: DataConfig, tokenizer: Any, *, seed: int, chat_template: str | None = None
) -> SFTData:
    """Read, convert, tokenize and split the SFT data described by `cfg`."""
    if not cfg.train:
        raise DataError("data.train is not set", hint="set data.train to a file or hub name")
    located = read_located(cfg.train, split=cfg.split, limit=cfg.limit)
    fmt = resolve_format(located.records, cfg, source=cfg.train)
    if cfg.eval:
        eval_located = read_located(cfg.eval, split=cfg.split)
        eval_fmt = resolve_format(eval_located.records, cfg, source=cfg.eval)
        train_located = located
    else:
        held = heldout_indices(len(located), cfg, seed)
        held_set = set(held)
        eval_located = subset(located, held)
        train_located = subset(located, [i for i in range(len(located)) if i not in held_set])
        eval_fmt = fmt
    train, stats, encoded = build_examples(train_located, fmt, cfg, tokenizer, chat_template)
    if not train:
        raise _nothing_left(stats, encoded, cfg)
    evals, eval_stats = [], TokenStats()
    if len(eval_located):
        evals, eval_stats, _ = build_examples(eval_located, eval_fmt, cfg, tokenizer, chat_template)
    return SFTData(train, evals, fmt, stats, eval_stats)


def suggest_max_length(lengths: list[int]) -> int:
    """A max_length that fits ~90% of rows, rounded up to a multiple of 64."""
    ranked = sorted(lengths)
    p90 = ranked[min(len(ranked) - 1, math.ceil(0.9 * len(ranked)) - 1)]
    return int(math.ceil(p90 / 64) * 64)


def _nothing_left(stats: TokenStats, encoded: list[Encoded], cfg: DataConfig) -> DataError:
    if stats.dropped_too_long:
        shortest_prompt = min(e.prompt_len for e in encoded)
        shortest = min(len(e.input_ids) for e in encoded)
        why = (
            f"data.max_length={cfg.max_length} is shorter than every prompt (the shortest "
            f"prompt is {shortest_prompt} tokens)"
            if shortest_prompt >= cfg.max_length
            else f"all {stats.dropped_too_long} rows are longer than data.max_length="
            f"{cfg.max_length} (the shortest row is {shortest} tokens)"
        )
        suggested = suggest_max_length([len(e.input_ids) for e in encoded])
        return DataError(
            f"no training rows left: {why}",
            hint=f"set data.max_length to about {suggested} (fits 90% of rows), "
            "or data.truncation=truncate",
        )
    return DataError(
        f"no training rows left: {stats.dropped_no_target} of {stats.rows_read} rows have no "
        "token to learn from (every label is masked)",
        hint="check that rows have assistant replies, or set data.completion_only=false",
    )
