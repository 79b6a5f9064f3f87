"""Preflight for KTO data: what KTO training would see, before any compute.

`preflight_kto` reads what :func:`~alignkit.data.preference.load_kto_data` reads: native
prompt/completion/label rows, or preference pairs (prompt/chosen/rejected, HH), each split into
one desirable and one undesirable example. It converts, renders and tokenizes them the same way
and reports instead of raising, with the desirable/undesirable counts KTO's class weights need.
`problems` are what would stop training (no usable example, rows that do not convert,
truncation=error meeting a long example, completions that never end in an end-of-turn token);
the rest are `warnings`.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from alignkit.config import DataConfig
from alignkit.data.formats import apply_column_map
from alignkit.data.io import read_located
from alignkit.data.pair_formats import (
    PromptMismatch,
    Unpaired,
    pair_to_unpaired,
    to_pair,
    to_unpaired,
)
from alignkit.data.preference import (
    KTO_FORMATS,
    PairStats,
    RenderedPrompt,
    encode_responses,
    fit_prompt,
    render_responses,
    resolve_pair_format,
)
from alignkit.data.preference_preflight import check_end_of_turn, open_report, report_conversion
from alignkit.data.preflight import LengthStats, PreflightReport
from alignkit.data.tokenize import suggest_max_length
from alignkit.errors import DataError


def preflight_kto(
    cfg: DataConfig, tokenizer: Any, *, chat_template: str | None = None
) -> PreflightReport:
    """Check KTO data as training would read it; raises only for unreadable files."""
    located, report = open_report(cfg, "unpaired", KTO_FORMATS)
    if report.problems:
        return report
    rows, rendered, wheres, errors = _convert(report, located, cfg, tokenizer, chat_template)
    report.valid_rows = len(rows)
    report_conversion(report, errors)
    if not rows:
        report.problems.append("no usable example: nothing to train on")
        return report
    ids = encode_responses(rendered, tokenizer)
    _measure(report, ids, cfg)
    _apply_policy(report, rows, ids, wheres, cfg)
    _check_content(report, rows)
    check_end_of_turn(report, ids, tokenizer)
    _example(report, rendered, ids, cfg)
    if cfg.eval:
        _check_eval(report, cfg)
    return report


def _convert(
    report: PreflightReport, located: Any, cfg: DataConfig, tokenizer: Any, chat_template: Any
) -> tuple[list[Unpaired], list[RenderedPrompt], list[str], list[str]]:
    """Every row as KTO examples (a pair gives two), rendered; bad rows collected, not raised."""
    rows: list[Unpaired] = []
    rendered: list[RenderedPrompt] = []
    wheres: list[str] = []
    errors: list[str] = []
    for record, where in zip(located.records, located.locations, strict=True):
        try:
            row = apply_column_map(record, cfg.column_map)
            if report.format == "kto":
                parts = [to_unpaired(row)]
            else:
                parts = pair_to_unpaired(to_pair(row, report.format))
            texts = [
                render_responses(p.prompt, [p.completion], tokenizer, chat_template) for p in parts
            ]
        except PromptMismatch:
            report.prompt_mismatch += 1
            continue
        except DataError as err:
            errors.append(f"{err.where or where}: {err.message}")
            continue
        rows.extend(parts)
        rendered.extend(texts)
        wheres.extend([where] * len(parts))
    return rows, rendered, wheres, errors


def _measure(report: PreflightReport, ids: list[list[list[int]]], cfg: DataConfig) -> None:
    prompts = [len(p) for p, _ in ids]
    completions = [len(c) for _, c in ids]
    totals = [p + c for p, c in zip(prompts, completions, strict=True)]
    report.lengths = {
        "prompt": LengthStats.of(prompts),
        "completion": LengthStats.of(completions),
        "total": LengthStats.of(totals),
    }
    report.over_max_length = sum(1 for n in totals if n > cfg.max_length)
    report.damaged = sum(1 for n in completions if n >= cfg.max_length)
    if report.over_max_length:
        report.suggested_max_length = suggest_max_length(totals)


def _apply_policy(
    report: PreflightReport,
    rows: list[Unpaired],
    ids: list[list[list[int]]],
    wheres: list[str],
    cfg: DataConfig,
) -> None:
    """What the truncation policy keeps, and the desirable/undesirable counts of what it keeps
    (KTO's class weights balance these)."""
    stats = PairStats(rows_read=report.rows, dropped_prompt_mismatch=report.prompt_mismatch)
    # "error" would stop training at the first long example; report what it would hit instead.
    policy = "drop" if cfg.truncation == "error" else cfg.truncation
    first_over = None
    for row, (prompt, completion), where in zip(rows, ids, wheres, strict=True):
        outcome = fit_prompt(prompt, [completion], cfg.max_length, policy).outcome
        stats.add(outcome)
        if outcome in ("kept", "truncated"):
            report.desirable += row.desirable
            report.undesirable += not row.desirable
        if first_over is None and len(prompt) + len(completion) > cfg.max_length:
            first_over = where
    report.stats = stats
    _policy_findings(report, len(ids), first_over, cfg)


def _policy_findings(
    report: PreflightReport, n: int, first_over: str | None, cfg: DataConfig
) -> None:
    stats, over = report.stats, report.over_max_length
    fix = f"data.max_length={report.suggested_max_length} fits 90% of examples"
    if over and cfg.truncation == "error":
        report.problems.append(
            f"{over} examples are longer than max_length={cfg.max_length} and truncation=error "
            f"stops training at the first ({first_over}); {fix}, or use drop/truncate"
        )
    elif over and cfg.truncation == "drop":
        report.warnings.append(
            f"{over} of {n} examples ({over / n:.1%}) are longer than max_length="
            f"{cfg.max_length} and will be dropped; {fix}"
        )
    elif over:
        report.warnings.append(
            f"{stats.truncated} of {n} examples ({stats.truncated / n:.1%}) will lose the left "
            f"of their prompt to fit max_length={cfg.max_length}; {fix}"
        )
    if report.damaged and cfg.truncation != "error":
        report.warnings.append(
            f"{report.damaged} examples have a completion that alone fills max_length="
            f"{cfg.max_length}: they are dropped under every policy"
        )
    if stats.dropped_no_target:
        report.warnings.append(
            f"{stats.dropped_no_target} examples have a completion with no tokens"
        )
    if stats.kept == 0:
        report.problems.append(
            f"no examples left: all {n} are longer than max_length={cfg.max_length}; set "
            f"data.max_length to about {report.suggested_max_length}"
            if over
            else "no examples left to train on"
        )


def _check_content(report: PreflightReport, rows: list[Unpaired]) -> None:
    keys = Counter(
        json.dumps([r.prompt, r.completion, r.desirable], sort_keys=True, ensure_ascii=False)
        for r in rows
    )
    report.duplicates = sum(n - 1 for n in keys.values())
    report.empty_targets = sum(
        1 for r in rows if any(not m["content"].strip() for m in r.completion)
    )
    if report.empty_targets:
        report.warnings.append(
            f"{report.empty_targets} examples have an empty completion (only the end-of-turn "
            "token): a desirable one teaches the model to answer with nothing"
        )
    if report.duplicates:
        report.warnings.append(f"{report.duplicates} examples are exact duplicates of another")


def _example(
    report: PreflightReport,
    rendered: list[RenderedPrompt],
    ids: list[list[list[int]]],
    cfg: DataConfig,
) -> None:
    """The first example that fits: prompt (masked) then its completion (in the loss)."""
    fits = (i for i, (p, c) in enumerate(ids) if len(p) + len(c) <= cfg.max_length)
    prompt, (completion,) = rendered[next(fits, 0)]
    report.example = [(prompt, False), (completion, True)]


def _check_eval(report: PreflightReport, cfg: DataConfig) -> None:
    try:
        located = read_located(cfg.eval, split=cfg.split)
        resolve_pair_format(located.records, cfg, source=cfg.eval, allowed=KTO_FORMATS)
    except DataError as err:
        report.problems.append(f"eval data: {err}")
        return
    report.eval_rows = len(located)
