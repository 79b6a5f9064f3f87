"""Preflight for PPO prompts: what rollouts would be generated from, before any compute.

`preflight_prompts` reads, column-maps, renders (with the generation prompt) and tokenizes the
prompts exactly as :func:`~alignkit.data.prompts.load_prompt_data` does, and reports instead
of raising. A prompt must leave room for the response: its budget is `data.max_length` minus
`ppo.max_new_tokens`, and `data.truncation` drops longer prompts, cuts their left side, or stops.
`problems` are what would stop training or leave it nothing to generate from (no usable prompt,
rows that do not convert, truncation=error meeting a long prompt, no room for a prompt at all);
duplicates, empty prompts, pairs whose prompts differ and what truncation drops or cuts are
`warnings`.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from alignkit.config import DataConfig, PPOConfig
from alignkit.data.formats import apply_column_map, check_format_name, detect_format
from alignkit.data.io import LocatedRecords, read_located
from alignkit.data.pair_formats import PromptMismatch
from alignkit.data.preflight import (
    MAX_LISTED_ERRORS,
    LengthStats,
    PreflightReport,
    named_format,
)
from alignkit.data.prompts import (
    PROMPT_FORMATS,
    PromptStats,
    fit_prompt_ids,
    prompt_budget,
    prompt_messages,
)
from alignkit.data.templates import render_messages, resolve_template
from alignkit.data.tokenize import suggest_max_length
from alignkit.errors import ConfigError, DataError

Message = dict[str, str]
DEFAULT_MAX_NEW_TOKENS = PPOConfig.model_fields["max_new_tokens"].default


def preflight_prompts(
    cfg: DataConfig,
    tokenizer: Any,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    system_prompt: str | None = None,
    chat_template: str | None = None,
) -> PreflightReport:
    """Check PPO prompt data as training would read it; raises only for unreadable files."""
    if not cfg.train:
        raise DataError("data.train is not set", hint="set data.train to a file of prompts")
    located = read_located(cfg.train, split=cfg.split, limit=cfg.limit)
    report = PreflightReport(
        cfg.train, "?", cfg.max_length, cfg.truncation, True, rows=len(located), kind="prompts"
    )
    try:
        report.format = _prompt_format(located.records, cfg)
    except DataError as err:
        report.format = named_format(located.records, cfg)
        report.problems.append(f"{err.message} ({err.hint})" if err.hint else err.message)
        return report
    try:
        report.prompt_budget = prompt_budget(cfg.max_length, max_new_tokens)
    except ConfigError as err:
        report.problems.append(f"{err.message} ({err.hint})")
    messages, texts, wheres = _render_all(
        report, located, cfg, tokenizer, system_prompt, chat_template
    )
    report.valid_rows = len(texts)
    if not texts:
        report.problems.append("no usable prompt: nothing to generate rollouts from")
        return report
    ids = [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    report.lengths = {"prompt": LengthStats.of([len(x) for x in ids])}
    if report.prompt_budget is None:
        return report
    kept = _apply_policy(report, ids, wheres, cfg, max_new_tokens)
    _check_content(report, messages, kept)
    index = next((i for i, x in enumerate(ids) if len(x) <= report.prompt_budget), 0)
    report.example = [(texts[index], False)]  # the policy's reply is generated after this text
    if cfg.eval:
        _check_eval(report, cfg)
    return report


def _prompt_format(records: list[dict], cfg: DataConfig) -> str:
    """The detected (or forced) format; DataError when it holds no prompts for PPO."""
    if cfg.format == "auto":
        fmt = detect_format(records, cfg.column_map)
    else:
        fmt = check_format_name(cfg.format)
    if fmt not in PROMPT_FORMATS:
        raise DataError(
            f"format '{fmt}' holds no prompts for PPO",
            hint=f"PPO reads {', '.join(PROMPT_FORMATS)} rows; map a column onto 'prompt' "
            "with data.column_map (e.g. question=prompt)",
        )
    return fmt


def _render_all(
    report: PreflightReport,
    located: LocatedRecords,
    cfg: DataConfig,
    tokenizer: Any,
    system_prompt: str | None,
    chat_template: str | None,
) -> tuple[list[list[Message]], list[str], list[str]]:
    """Each row's prompt messages and rendered text; bad rows are collected, not raised."""
    template = resolve_template(tokenizer, chat_template)
    messages, texts, wheres, errors = [], [], [], []
    stats = PromptStats(rows_read=report.rows)
    for record, where in zip(located.records, located.locations, strict=True):
        try:
            conv = prompt_messages(apply_column_map(record, cfg.column_map), report.format)
            if system_prompt and conv[0]["role"] != "system":
                conv = [{"role": "system", "content": system_prompt}, *conv]
            text = render_messages(tokenizer, conv, template, generation_prompt=True)
        except PromptMismatch:
            stats.dropped_prompt_mismatch += 1
            continue
        except DataError as err:
            errors.append(f"{err.where or where}: {err.message}")
            continue
        messages.append(conv)
        texts.append(text)
        wheres.append(where)
    report.stats = stats
    report.prompt_mismatch = stats.dropped_prompt_mismatch
    if errors:
        listed = "; ".join(errors[:MAX_LISTED_ERRORS])
        more = len(errors) - MAX_LISTED_ERRORS
        report.problems.append(
            f"{len(errors)} rows hold no usable prompt (training stops at the first): {listed}"
            + (f"; and {more} more" if more > 0 else "")
        )
    if report.prompt_mismatch:
        report.warnings.append(
            f"{report.prompt_mismatch} of {report.rows} pairs have chosen and rejected "
            "conversations that differ before their final replies: no shared prompt, dropped"
        )
    return messages, texts, wheres


def _apply_policy(
    report: PreflightReport,
    ids: list[list[int]],
    wheres: list[str],
    cfg: DataConfig,
    max_new_tokens: int,
) -> list[bool]:
    """What data.truncation does to each prompt; returns which prompts training keeps."""
    budget = report.prompt_budget
    stats = report.stats
    # "error" would stop training at the first long prompt; report what it would hit instead.
    policy = "drop" if cfg.truncation == "error" else cfg.truncation
    kept = []
    for row_ids, where in zip(ids, wheres, strict=True):
        fitted = fit_prompt_ids(row_ids, budget, policy, where)
        kept.append(fitted is not None)
        stats.kept += fitted is not None
        stats.dropped_too_long += fitted is None
        stats.truncated += fitted is not None and len(fitted) < len(row_ids)
    lengths = [len(x) for x in ids]
    over, n = sum(1 for x in lengths if x > budget), len(ids)
    report.over_max_length = over
    budget_of = f"the {budget}-token prompt budget (max_length={cfg.max_length} - "
    budget_of += f"max_new_tokens={max_new_tokens})"
    if over:  # 99%, not suggest_max_length's 90%: prompts are short next to their responses
        p99 = report.lengths["prompt"].p99
        report.suggested_max_length = suggest_max_length([p99]) + max_new_tokens
    fix = f"data.max_length={report.suggested_max_length} fits 99% of prompts"
    if over and cfg.truncation == "error":
        first = next(w for w, x in zip(wheres, lengths, strict=True) if x > budget)
        report.problems.append(
            f"{over} prompts are longer than {budget_of} and truncation=error stops training "
            f"at the first ({first}); {fix}, or use drop/truncate"
        )
    elif over and cfg.truncation == "drop":
        report.warnings.append(
            f"{over} of {n} prompts ({over / n:.1%}) are longer than {budget_of} and will be "
            f"dropped; {fix}"
        )
    elif over:
        report.warnings.append(
            f"{over} of {n} prompts ({over / n:.1%}) are longer than {budget_of} and will lose "
            f"their left side (the template header and system turn first); {fix}"
        )
    if stats.kept == 0:
        report.problems.append(
            f"no usable prompt: all {n} are longer than {budget_of}; set data.max_length to "
            f"about {report.suggested_max_length} or lower max_new_tokens"
        )
    return kept


def _check_content(
    report: PreflightReport, messages: list[list[Message]], kept: list[bool]
) -> None:
    keys = Counter(json.dumps(m, sort_keys=True, ensure_ascii=False) for m in messages)
    report.duplicates = sum(n - 1 for n in keys.values())
    empty = [not m[-1]["content"].strip() for m in messages]
    report.empty_prompts = sum(empty)
    if report.duplicates:
        report.warnings.append(
            f"{report.duplicates} prompts are exact duplicates of another: they are sampled more "
            "often, and may land in both the training and the held-out prompts"
        )
    if report.empty_prompts:
        report.warnings.append(
            f"{report.empty_prompts} prompts have an empty user message: the policy is rewarded "
            "for answering nothing in particular"
        )
    if report.stats.kept and all(e for e, k in zip(empty, kept, strict=True) if k):
        report.problems.append("no usable prompt: every kept prompt has an empty user message")


def _check_eval(report: PreflightReport, cfg: DataConfig) -> None:
    try:
        located = read_located(cfg.eval, split=cfg.split)
        _prompt_format(located.records, cfg)
    except DataError as err:
        report.problems.append(f"eval data: {err}")
        return
    report.eval_rows = len(located)
