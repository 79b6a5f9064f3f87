"""Preference pairs and KTO examples: tokenize with an explicit truncation policy, build
train/eval sets. Conversion of rows to canonical pairs lives in :mod:`alignkit.data.pair_formats`.

Tokenization: ``prompt_ids`` is the template's rendering of the prompt with the generation prompt;
each response's ids are the rest of ``render(prompt + response)`` up to and including the
end-of-turn token, so ``prompt_ids + chosen_ids`` is exactly what the model reads and writes.

Truncation (``data.truncation``) bounds prompt + the longer response by ``data.max_length``: drop
the pair, cut the prompt's left side, or fail naming the row. A response is never cut (that would
change what is preferred): a pair whose response alone leaves no room for a prompt is dropped
and counted as damaged even under "truncate". KTO examples follow the same rules one by one;
their stats count rows read (a pair is one row) and examples kept (a pair gives two).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from alignkit.config import DataConfig
from alignkit.data.formats import apply_column_map, check_format_name, detect_format
from alignkit.data.io import LocatedRecords, read_located
from alignkit.data.pair_formats import (
    Message,
    Pair,
    PromptMismatch,
    Unpaired,
    pair_to_unpaired,
    to_pair,
    to_unpaired,
)
from alignkit.data.templates import render_messages, resolve_template
from alignkit.data.tokenize import (
    TOKENIZE_CHUNK,
    heldout_indices,
    require_fast,
    subset,
    with_where,
)
from alignkit.errors import DataError

PREFERENCE_FORMATS = ("preference", "hh")
KTO_FORMATS = ("kto", "preference", "hh")
PairOutcome = Literal["kept", "truncated", "too_long", "damaged", "no_target"]


@dataclass
class PairExample:
    prompt_ids: list[int]
    chosen_ids: list[int]  # reply tokens incl. the end-of-turn token
    rejected_ids: list[int]

    def __len__(self) -> int:
        """Tokens of the longest plain row, prompt + longer response (what max_length bounds)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def shared_len(self) -> int:
        """Tokens of the prefix-shared row: prompt + chosen + rejected."""
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class KTOExample:
    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


class RenderedPrompt(NamedTuple):
    """The prompt's text (with generation prompt) and each response's text after it."""

    prompt: str
    responses: list[str]


def render_responses(
    prompt: list[Message], responses: list[list[Message]], tokenizer: Any, chat_template=None
) -> RenderedPrompt:
    """Render the prompt once and each response as the rest of ``render(prompt + response)``.

    Trailing whitespace after the end-of-turn token is left out, as in
    :func:`~alignkit.data.templates.render_conversation`: the model never has to predict it.
    """
    template = resolve_template(tokenizer, chat_template)
    head = render_messages(tokenizer, prompt, template, generation_prompt=True)
    texts = []
    for response in responses:
        full = render_messages(tokenizer, prompt + response, template, generation_prompt=False)
        if not full.startswith(head):
            raise DataError(
                "the chat template is not prefix-stable: the prompt rendered with a generation "
                "prompt does not start the prompt rendered with its reply",
                hint="set model.chat_template to chatml, llama3, alpaca or a Jinja string",
            )
        texts.append(full[len(head) :].rstrip())
    return RenderedPrompt(head, texts)


def encode_responses(rendered: list[RenderedPrompt], tokenizer: Any) -> list[list[list[int]]]:
    """Token ids per rendered row: [prompt_ids, response_ids, ...].

    Each response is tokenized together with its prompt and the prompt's tokens cut off, so the
    ids are what tokenizing the whole conversation gives. Where BPE merges across the boundary
    (a reply starting with whitespace the generation prompt ends in) the prompt's tokens would
    differ between chosen and rejected; the response text is then tokenized on its own, which
    decodes to the same text and keeps one prompt for both.
    """
    require_fast(tokenizer)
    out: list[list[list[int]]] = []
    for start in range(0, len(rendered), TOKENIZE_CHUNK):
        chunk = rendered[start : start + TOKENIZE_CHUNK]
        texts = [t for r in chunk for t in (r.prompt, *(r.prompt + x for x in r.responses))]
        ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"])
        for r in chunk:
            prompt_ids = list(next(ids))
            row = [prompt_ids]
            for text in r.responses:
                full = list(next(ids))
                if full[: len(prompt_ids)] == prompt_ids:
                    row.append(full[len(prompt_ids) :])
                else:
                    row.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
            out.append(row)
    return out


@dataclass
class PairStats:
    """What conversion and the truncation policy did, in rows (pairs, or KTO examples)."""

    rows_read: int = 0
    kept: int = 0  # includes the truncated ones
    truncated: int = 0  # prompt's left side cut
    dropped_too_long: int = 0  # truncation=drop
    dropped_damaged: int = 0  # truncation=truncate, but a response alone leaves no prompt room
    dropped_no_target: int = 0  # a response with no tokens at all
    dropped_prompt_mismatch: int = 0  # chosen/rejected answer different conversations
    identical: int = 0  # kept pairs with chosen == rejected (no learning signal)

    def add(self, outcome: PairOutcome) -> None:
        if outcome in ("kept", "truncated"):
            self.kept += 1
        if outcome == "truncated":
            self.truncated += 1
        elif outcome == "too_long":
            self.dropped_too_long += 1
        elif outcome == "damaged":
            self.dropped_damaged += 1
        elif outcome == "no_target":
            self.dropped_no_target += 1


class FittedIds(NamedTuple):
    prompt_ids: list[int] | None  # None: dropped
    outcome: PairOutcome


def fit_prompt(
    prompt_ids: list[int],
    responses: list[list[int]],
    max_length: int,
    truncation: str,
    *,
    where: str | None = None,
) -> FittedIds:
    """Apply the truncation policy to prompt + the longest response (the plain layout's row).

    "truncate" cuts the prompt's left side. A response is never cut: that would change what is
    being compared, so when the longest response leaves no room for even one prompt token (the
    token that predicts the response's first) the row is damaged and dropped under any policy.
    """
    if truncation not in ("drop", "truncate", "error"):
        raise DataError(f"unknown truncation policy '{truncation}'")
    if any(not r for r in responses):
        return FittedIds(None, "no_target")
    longest = max(len(r) for r in responses)
    n = len(prompt_ids) + longest
    if n <= max_length:
        return FittedIds(prompt_ids, "kept")
    if truncation == "error":
        raise DataError(
            f"prompt + longest response is {n} tokens, longer than data.max_length={max_length}",
            where=where,
            hint="raise data.max_length, or set data.truncation to drop or truncate",
        )
    if truncation == "drop":
        return FittedIds(None, "too_long")
    room = max_length - longest
    if room < 1:
        return FittedIds(None, "damaged")
    return FittedIds(prompt_ids[-room:], "truncated")


def tokenize_pair(
    pair: Pair,
    tokenizer: Any,
    *,
    max_length: int,
    truncation: str,
    chat_template: str | None = None,
    where: str | None = None,
) -> PairExample | None:
    """One pair to ids; None when the policy drops it."""
    rendered = render_responses(pair.prompt, [pair.chosen, pair.rejected], tokenizer, chat_template)
    prompt_ids, chosen_ids, rejected_ids = encode_responses([rendered], tokenizer)[0]
    fitted = fit_prompt(prompt_ids, [chosen_ids, rejected_ids], max_length, truncation, where=where)
    if fitted.prompt_ids is None:
        return None
    return PairExample(fitted.prompt_ids, chosen_ids, rejected_ids)


# ---------------------------------------------------------------------------------------------
# Datasets


@dataclass
class PreferenceData:
    train: list[PairExample]
    eval: list[PairExample]
    format: str
    stats: PairStats
    eval_stats: PairStats = field(default_factory=PairStats)


@dataclass
class KTOData:
    train: list[KTOExample]
    eval: list[KTOExample]
    format: str
    stats: PairStats
    eval_stats: PairStats = field(default_factory=PairStats)

    @property
    def desirable_counts(self) -> tuple[int, int]:
        """(desirable, undesirable) training examples, for KTO's class weights."""
        good = sum(1 for e in self.train if e.desirable)
        return good, len(self.train) - good


def resolve_pair_format(
    records: list[dict], cfg: DataConfig, *, source: str, allowed: tuple[str, ...]
) -> str:
    """cfg.format or the detected one; formats without pairs (or labels) are refused."""
    try:
        fmt = detect_format(records, cfg.column_map) if cfg.format == "auto" else cfg.format
        check_format_name(fmt)
    except DataError as err:
        raise with_where(err, source) from None
    if fmt not in allowed:
        kto = "kto" in allowed
        need = (
            "prompt/completion/label rows, or preference pairs (prompt/chosen/rejected, HH)"
            if kto
            else "prompt/chosen/rejected rows or raw HH chosen/rejected transcripts"
        )
        raise DataError(
            f"format '{fmt}' is not {'KTO' if kto else 'preference'} data",
            where=source,
            hint=f"this method reads {need}; single replies train with sft"
            + ("" if kto else ", or with kto given a boolean label column")
            + "; rename columns with data.column_map",
        )
    return fmt


def convert_located(
    located: LocatedRecords, fmt: str, cfg: DataConfig, stats: PairStats
) -> tuple[list[Pair | Unpaired], list[str]]:
    """Column-map and convert every row; mismatched pairs are counted, other errors raised."""
    items: list[Pair | Unpaired] = []
    wheres: list[str] = []
    for record, where in zip(located.records, located.locations, strict=True):
        try:
            row = apply_column_map(record, cfg.column_map)
            items.append(to_unpaired(row) if fmt == "kto" else to_pair(row, fmt))
        except PromptMismatch:
            stats.dropped_prompt_mismatch += 1
            continue
        except DataError as err:
            raise with_where(err, where) from None
        wheres.append(where)
    return items, wheres


def render_rows(
    items: list[tuple[list[Message], list[list[Message]]]],
    wheres: list[str],
    tokenizer: Any,
    chat_template: str | None,
) -> list[list[list[int]]]:
    """Token ids of (prompt, responses) items: per item [prompt ids, response ids...]; a row that
    cannot be rendered raises a DataError naming its `where`."""
    rendered = []
    for (prompt, responses), where in zip(items, wheres, strict=True):
        try:
            rendered.append(render_responses(prompt, responses, tokenizer, chat_template))
        except DataError as err:
            raise with_where(err, where) from None
    return encode_responses(rendered, tokenizer)


def build_pairs(
    located: LocatedRecords, fmt: str, cfg: DataConfig, tokenizer: Any, chat_template=None
) -> tuple[list[PairExample], PairStats]:
    """Pairs that survive the truncation policy, with what happened to the rest."""
    stats = PairStats(rows_read=len(located))
    pairs, wheres = convert_located(located, fmt, cfg, stats)
    items = [(p.prompt, [p.chosen, p.rejected]) for p in pairs]
    ids = render_rows(items, wheres, tokenizer, chat_template)
    examples = []
    for pair, (prompt_ids, chosen, rejected), where in zip(pairs, ids, wheres, strict=True):
        responses = [chosen, rejected]
        fitted = fit_prompt(prompt_ids, responses, cfg.max_length, cfg.truncation, where=where)
        stats.add(fitted.outcome)
        if fitted.prompt_ids is not None:
            examples.append(PairExample(fitted.prompt_ids, chosen, rejected))
            stats.identical += pair.chosen == pair.rejected
    return examples, stats


def build_kto(
    located: LocatedRecords, fmt: str, cfg: DataConfig, tokenizer: Any, chat_template=None
) -> tuple[list[KTOExample], PairStats]:
    """KTO examples; paired data is made unpaired (one desirable + one undesirable per pair)."""
    stats = PairStats(rows_read=len(located))
    items, wheres = convert_located(located, fmt, cfg, stats)
    rows: list[Unpaired] = []
    row_wheres: list[str] = []
    for item, where in zip(items, wheres, strict=True):
        parts = pair_to_unpaired(item) if isinstance(item, Pair) else [item]
        rows.extend(parts)
        row_wheres.extend([where] * len(parts))
    to_render = [(r.prompt, [r.completion]) for r in rows]
    ids = render_rows(to_render, row_wheres, tokenizer, chat_template)
    examples = []
    for row, (prompt_ids, completion), where in zip(rows, ids, row_wheres, strict=True):
        fitted = fit_prompt(prompt_ids, [completion], cfg.max_length, cfg.truncation, where=where)
        stats.add(fitted.outcome)
        if fitted.prompt_ids is not None:
            examples.append(KTOExample(fitted.prompt_ids, completion, row.desirable))
    return examples, stats


def read_split(
    cfg: DataConfig, seed: int, allowed: tuple[str, ...]
) -> tuple[LocatedRecords, str, LocatedRecords, str]:
    """(train rows, format, eval rows, eval format): data.eval, or a seeded held-out share."""
    if not cfg.train:
        raise DataError("data.train is not set", hint="set data.train to a file or hub name")
    located = read_located(cfg.train, split=cfg.split, limit=cfg.limit)
    fmt = resolve_pair_format(located.records, cfg, source=cfg.train, allowed=allowed)
    if cfg.eval:
        eval_located = read_located(cfg.eval, split=cfg.split)
        eval_fmt = resolve_pair_format(eval_located.records, cfg, source=cfg.eval, allowed=allowed)
        return located, fmt, eval_located, eval_fmt
    held = set(heldout_indices(len(located), cfg, seed))
    train = subset(located, [i for i in range(len(located)) if i not in held])
    return train, fmt, subset(located, sorted(held)), fmt


def load_preference_data(
    cfg: DataConfig, tokenizer: Any, *, seed: int, chat_template: str | None = None
) -> PreferenceData:
    """Read, convert, tokenize and split preference pairs described by `cfg`."""
    train_rows, fmt, eval_rows, eval_fmt = read_split(cfg, seed, PREFERENCE_FORMATS)
    train, stats = build_pairs(train_rows, fmt, cfg, tokenizer, chat_template)
    if not train:
        raise nothing_left_error(stats, cfg, "pairs")
    evals, eval_stats = [], PairStats()
    if len(eval_rows):
        evals, eval_stats = build_pairs(eval_rows, eval_fmt, cfg, tokenizer, chat_template)
    return PreferenceData(train, evals, fmt, stats, eval_stats)


def load_kto_data(
    cfg: DataConfig, tokenizer: Any, *, seed: int, chat_template: str | None = None
) -> KTOData:
    """KTO examples from prompt/completion/label rows or from pairs (split before unpairing, so
    both halves of a pair land on the same side)."""
    train_rows, fmt, eval_rows, eval_fmt = read_split(cfg, seed, KTO_FORMATS)
    train, stats = build_kto(train_rows, fmt, cfg, tokenizer, chat_template)
    if not train:
        raise nothing_left_error(stats, cfg, "examples")
    evals, eval_stats = [], PairStats()
    if len(eval_rows):
        evals, eval_stats = build_kto(eval_rows, eval_fmt, cfg, tokenizer, chat_template)
    return KTOData(train, evals, fmt, stats, eval_stats)


def nothing_left_error(stats: PairStats, cfg: DataConfig, what: str) -> DataError:
    """The error for a split that kept no rows, saying how many were dropped for what."""
    parts = [
        f"{n} {why}"
        for n, why in (
            (stats.dropped_too_long, f"longer than data.max_length={cfg.max_length}"),
            (stats.dropped_damaged, "with a response that alone fills data.max_length"),
            (stats.dropped_prompt_mismatch, "whose chosen and rejected answer different prompts"),
            (stats.dropped_no_target, "with an empty tokenized response"),
        )
        if n
    ]
    return DataError(
        f"no training {what} left of {stats.rows_read} rows: " + "; ".join(parts),
        hint="raise data.max_length (run `alignkit data check` for the lengths), or set "
        "data.truncation=truncate"
        if stats.dropped_too_long or stats.dropped_damaged
        else "check the rows with `alignkit data check`",
    )
