"""Preflight for preference data: what DPO-style training would see, before any compute.

`preflight_preference` reads, converts, renders and tokenizes pairs exactly as
:func:`~alignkit.data.preference.load_preference_data` does, and reports instead of raising.
`problems` are what would stop training or leave it nothing to learn from (no usable pair, rows
that do not convert, truncation=error meeting a long pair, replies that never end in an
end-of-turn token); the rest (differing prompts, chosen == rejected, empty replies, duplicates,
pairs truncation drops or damages) are `warnings`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from alignkit.config import DataConfig
from alignkit.data.formats import apply_column_map
from alignkit.data.io import read_located
from alignkit.data.pair_formats import Pair, PromptMismatch, pair_key, to_pair
from alignkit.data.preference import (
    PREFERENCE_FORMATS,
    PairStats,
    RenderedPrompt,
    encode_responses,
    fit_prompt,
    render_responses,
    resolve_pair_format,
)
from alignkit.data.preflight import (
    MAX_LISTED_ERRORS,
    LengthStats,
    PreflightReport,
    named_format,
    special_ids,
)
from alignkit.data.tokenize import suggest_max_length
from alignkit.errors import DataError


def open_report(cfg: DataConfig, kind: str, allowed) -> tuple[Any, PreflightReport]:
    """Read a pair-shaped data file and start its report: the rows and the report, whose
    problems name the format when it is none of `allowed` (then nothing else is checked)."""
    if not cfg.train:
        raise DataError("data.train is not set", hint="set data.train to a file or hub name")
    located = read_located(cfg.train, split=cfg.split, limit=cfg.limit)
    report = PreflightReport(
        cfg.train, "?", cfg.max_length, cfg.truncation, True, rows=len(located), kind=kind
    )
    try:
        report.format = resolve_pair_format(located.records, cfg, source=cfg.train, allowed=allowed)
    except DataError as err:
        report.format = named_format(located.records, cfg)
        report.problems.append(f"{err.message} ({err.hint})" if err.hint else err.message)
    return located, report


def preflight_preference(
    cfg: DataConfig, tokenizer: Any, *, chat_template: str | None = None
) -> PreflightReport:
    """Check preference data as training would read it; raises only for unreadable files."""
    located, report = open_report(cfg, "preference", PREFERENCE_FORMATS)
    if report.problems:
        return report
    pairs, rendered, wheres = [], [], []
    errors: list[str] = []
    for record, where in zip(located.records, located.locations, strict=True):
        try:
            pair = to_pair(apply_column_map(record, cfg.column_map), report.format)
            texts = render_responses(
                pair.prompt, [pair.chosen, pair.rejected], tokenizer, chat_template
            )
        except PromptMismatch:
            report.prompt_mismatch += 1
            continue
        except DataError as err:
            errors.append(f"{err.where or where}: {err.message}")
            continue
        pairs.append(pair)
        rendered.append(texts)
        wheres.append(where)
    report.valid_rows = len(pairs)
    report_conversion(report, errors)
    if not pairs:
        report.problems.append("no usable pair: nothing to train on")
        return report
    ids = encode_responses(rendered, tokenizer)
    _measure(report, ids, cfg)
    _apply_policy(report, pairs, ids, wheres, cfg)
    _check_content(report, pairs)
    check_end_of_turn(report, ids, tokenizer)
    _example(report, rendered, ids, cfg)
    if cfg.eval:
        _check_eval(report, cfg)
    return report


def report_conversion(report: PreflightReport, errors: list[str]) -> None:
    """Rows that do not convert are a problem (training stops at the first); pairs whose
    prompts differ are dropped by training, a warning."""
    if errors:
        listed = "; ".join(errors[:MAX_LISTED_ERRORS])
        more = len(errors) - MAX_LISTED_ERRORS
        report.problems.append(
            f"{len(errors)} rows cannot be converted (training stops at the first): {listed}"
            + (f"; and {more} more" if more > 0 else "")
        )
    if report.prompt_mismatch:
        report.warnings.append(
            f"{report.prompt_mismatch} of {report.rows} pairs have chosen and rejected "
            "conversations that differ before their final replies (they answer different "
            "prompts): they are dropped"
        )


def _measure(report: PreflightReport, ids: list[list[list[int]]], cfg: DataConfig) -> None:
    prompts = [len(p) for p, _, _ in ids]
    chosen = [len(c) for _, c, _ in ids]
    rejected = [len(r) for _, _, r in ids]
    totals = [p + max(c, r) for p, c, r in zip(prompts, chosen, rejected, strict=True)]
    report.lengths = {
        "prompt": LengthStats.of(prompts),
        "chosen": LengthStats.of(chosen),
        "rejected": LengthStats.of(rejected),
        "total": LengthStats.of(totals),
    }
    report.over_max_length = sum(1 for n in totals if n > cfg.max_length)
    # Damaged: the longer response leaves no room for even the one prompt token predicting it.
    longest = [max(c, r) for c, r in zip(chosen, rejected, strict=True)]
    report.damaged = sum(1 for n in longest if n >= cfg.max_length)
    if report.over_max_length:
        report.suggested_max_length = suggest_max_length(totals)


def _apply_policy(
    report: PreflightReport,
    pairs: list[Pair],
    ids: list[list[list[int]]],
    wheres: list[str],
    cfg: DataConfig,
) -> None:
    stats = PairStats(rows_read=report.rows, dropped_prompt_mismatch=report.prompt_mismatch)
    # "error" would stop training at the first long pair; report what it would hit instead.
    policy = "drop" if cfg.truncation == "error" else cfg.truncation
    first_over = None
    for pair, (prompt, chosen, rejected), where in zip(pairs, ids, wheres, strict=True):
        outcome = fit_prompt(prompt, [chosen, rejected], cfg.max_length, policy).outcome
        stats.add(outcome)
        if outcome in ("kept", "truncated"):
            stats.identical += pair.chosen == pair.rejected
        if first_over is None and len(prompt) + max(len(chosen), len(rejected)) > cfg.max_length:
            first_over = where
    report.stats = stats
    over, n = report.over_max_length, len(ids)
    fix = f"data.max_length={report.suggested_max_length} fits 90% of pairs"
    if over and cfg.truncation == "error":
        report.problems.append(
            f"{over} pairs are longer than max_length={cfg.max_length} (prompt + longest "
            f"response) and truncation=error stops training at the first ({first_over}); "
            f"{fix}, or use drop/truncate"
        )
    elif over and cfg.truncation == "drop":
        report.warnings.append(
            f"{over} of {n} pairs ({over / n:.1%}) are longer than max_length={cfg.max_length} "
            f"(prompt + longest response) and will be dropped; {fix}"
        )
    elif over:
        report.warnings.append(
            f"{stats.truncated} of {n} pairs ({stats.truncated / n:.1%}) will lose the left of "
            f"their prompt to fit max_length={cfg.max_length}; {fix}"
        )
    if report.damaged and cfg.truncation != "error":
        report.warnings.append(
            f"{report.damaged} pairs have a response that alone fills max_length="
            f"{cfg.max_length}: they are dropped under every policy (cutting a response changes "
            "what is preferred)"
        )
    if stats.dropped_no_target:
        report.warnings.append(f"{stats.dropped_no_target} pairs have a response with no tokens")
    if stats.kept == 0:
        report.problems.append(
            f"no pairs left: all {n} are longer than max_length={cfg.max_length}; set "
            f"data.max_length to about {report.suggested_max_length}"
            if over
            else "no pairs left to train on"
        )


def _check_content(report: PreflightReport, pairs: list[Pair]) -> None:
    keys = Counter(pair_key(p) for p in pairs)
    report.duplicates = sum(n - 1 for n in keys.values())
    report.identical_pairs = sum(1 for p in pairs if p.chosen == p.rejected)
    report.empty_targets = sum(
        1 for p in pairs if any(not m["content"].strip() for m in p.chosen + p.rejected)
    )
    n = len(pairs)
    if report.identical_pairs:
        report.warnings.append(
            f"{report.identical_pairs} of {n} pairs have chosen identical to rejected: they teach "
            "nothing (their loss gradient is zero) and dilute the batch"
        )
    if report.empty_targets:
        report.warnings.append(
            f"{report.empty_targets} pairs have an empty response (only the end-of-turn token): "
            "preferring it teaches the model to answer with nothing"
        )
    if report.duplicates:
        report.warnings.append(f"{report.duplicates} pairs are exact duplicates of another pair")


def check_end_of_turn(report: PreflightReport, ids: list[list[list[int]]], tokenizer: Any) -> None:
    """Every response should end in the template's end-of-turn token, one generation stops on.

    `ids` rows are [prompt ids, response ids...], any number of responses (KTO has one)."""
    ends = Counter(resp[-1] for _, *responses in ids for resp in responses if resp)
    if not ends:
        return
    eot_id, _ = ends.most_common(1)[0]
    report.eot_token = tokenizer.convert_ids_to_tokens(eot_id)
    report.eot_in_loss = eot_id in special_ids(tokenizer) and report.stats.kept > 0
    if eot_id not in special_ids(tokenizer):
        report.problems.append(
            f"responses end with '{report.eot_token}', not an end-of-turn token: the preference "
            "never covers stopping; set model.chat_template to one that fits the tokenizer"
        )
    elif eot_id != tokenizer.eos_token_id:
        report.warnings.append(
            f"responses end with '{report.eot_token}', not the tokenizer's EOS "
            f"'{tokenizer.eos_token}': generation must also stop on it"
        )


def _example(
    report: PreflightReport,
    rendered: list[RenderedPrompt],
    ids: list[list[list[int]]],
    cfg: DataConfig,
) -> None:
    """The first pair that fits: prompt (masked) then each response (in the loss)."""
    fits = (i for i, (p, c, r) in enumerate(ids) if len(p) + max(len(c), len(r)) <= cfg.max_length)
    index = next(fits, 0)
    prompt, (chosen, rejected) = rendered[index]
    report.example = [(prompt, False), (chosen, True)]
    report.example_rejected = [(prompt, False), (rejected, True)]


def _check_eval(report: PreflightReport, cfg: DataConfig) -> None:
    try:
        located = read_located(cfg.eval, split=cfg.split)
        resolve_pair_format(located.records, cfg, source=cfg.eval, allowed=PREFERENCE_FORMATS)
    except DataError as err:
        report.problems.append(f"eval data: {err}")
        return
    report.eval_rows = len(located)
