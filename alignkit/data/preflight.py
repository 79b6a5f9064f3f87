"""Preflight for SFT data: what training would see, before spending any compute on it.

`preflight_sft` reads and tokenizes the data exactly as training will (same converters, template,
label masks and truncation policy) and reports what would go wrong. `problems` are findings that
make training meaningless (nothing left to train on, no label tokens, replies that never end in
an end-of-turn token); `warnings` are worth reading but need not stop a run.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from alignkit.config import DataConfig
from alignkit.data.formats import apply_column_map, detect_format, to_messages
from alignkit.data.io import read_located
from alignkit.data.templates import Rendered
from alignkit.data.tokenize import (
    IGNORE_INDEX,
    Encoded,
    TokenStats,
    encode_rendered,
    fit_to_length,
    render_row,
    resolve_format,
    suggest_max_length,
)
from alignkit.errors import DataError

MAX_LISTED_ERRORS = 5


@dataclass
class LengthStats:
    min: int
    p50: int
    p90: int
    p99: int
    max: int

    @classmethod
    def of(cls, values: list[int]) -> LengthStats:
        if not values:
            return cls(0, 0, 0, 0, 0)
        ranked = sorted(values)

        def pct(q: float) -> int:  # nearest-rank percentile: always an observed length
            return ranked[max(0, math.ceil(q * len(ranked)) - 1)]

        return cls(ranked[0], pct(0.5), pct(0.9), pct(0.99), ranked[-1])


@dataclass
class PreflightReport:
    source: str
    format: str
    max_length: int
    truncation: str
    completion_only: bool
    rows: int = 0  # rows read
    valid_rows: int = 0  # rows that convert and render
    stats: TokenStats = field(default_factory=TokenStats)  # what the truncation policy does
    lengths: dict[str, LengthStats] = field(default_factory=dict)  # prompt/response/total
    over_max_length: int = 0
    prompt_lost: int = 0  # truncate: rows whose whole prompt would be cut away
    eot_lost: int = 0  # truncate: rows whose response loses its end (and end-of-turn token)
    duplicates: int = 0
    empty_targets: int = 0
    eot_token: str | None = None
    eot_in_loss: bool = False
    suggested_max_length: int | None = None
    eval_rows: int | None = None
    example: list[tuple[str, bool]] = field(default_factory=list)  # (text, trained) segments
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # Preference data (kind="preference"): stats is then a PairStats, `example` the chosen side.
    kind: str = "sft"
    prompt_mismatch: int = 0  # chosen and rejected answer different prompts (dropped)
    identical_pairs: int = 0  # chosen == rejected
    damaged: int = 0  # a response alone leaves no room for the prompt within max_length
    example_rejected: list[tuple[str, bool]] = field(default_factory=list)
    # PPO prompts (kind="prompts"): stats is then a PromptStats, `example` the rendered prompt.
    prompt_budget: int | None = None  # data.max_length minus ppo.max_new_tokens
    empty_prompts: int = 0
    # KTO examples (kind="unpaired"): stats is a PairStats counting examples (a pair gives two).
    desirable: int = 0  # kept examples labelled desirable
    undesirable: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def example_marked(self) -> str:
        """The example as plain text, trained parts marked [[like this]]."""
        return "".join(f"[[{t}]]" if trained else t for t, trained in self.example)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["example"] = [{"text": t, "trained": trained} for t, trained in self.example]
        out["example_rejected"] = [
            {"text": t, "trained": trained} for t, trained in self.example_rejected
        ]
        out["example_marked"] = self.example_marked
        out["ok"] = self.ok
        return out


@dataclass
class _Rows:
    where: list[str]
    conversations: list[Any]
    rendered: list[Rendered]
    errors: list[str]


def _convert_all(
    records: list[dict],
    locations: list[str],
    fmt: str,
    cfg: DataConfig,
    tokenizer: Any,
    chat_template: str | None,
) -> _Rows:
    """Convert and render every row, collecting (not raising) the errors of bad ones."""
    rows = _Rows([], [], [], [])
    for record, where in zip(records, locations, strict=True):
        try:
            conv = to_messages(apply_column_map(record, cfg.column_map), fmt)
            rendered = render_row(conv, tokenizer, chat_template)
        except DataError as err:
            rows.errors.append(f"{err.where or where}: {err.message}")
            continue
        rows.where.append(where)
        rows.conversations.append(conv)
        rows.rendered.append(rendered)
    return rows


def preflight_sft(
    cfg: DataConfig, tokenizer: Any, *, chat_template: str | None = None
) -> PreflightReport:
    """Check SFT data as training would read it; never raises for bad rows, only for bad files."""
    if not cfg.train:
        raise DataError("data.train is not set", hint="set data.train to a file or hub name")
    located = read_located(cfg.train, split=cfg.split, limit=cfg.limit)
    report = PreflightReport(
        cfg.train, "?", cfg.max_length, cfg.truncation, cfg.completion_only, rows=len(located)
    )
    try:
        report.format = resolve_format(located.records, cfg, source=cfg.train)
    except DataError as err:
        report.format = named_format(located.records, cfg)
        report.problems.append(f"{err.message} ({err.hint})" if err.hint else err.message)
        return report
    rows = _convert_all(
        located.records, located.locations, report.format, cfg, tokenizer, chat_template
    )
    report.valid_rows = len(rows.rendered)
    if rows.errors:
        listed = "; ".join(rows.errors[:MAX_LISTED_ERRORS])
        more = len(rows.errors) - MAX_LISTED_ERRORS
        report.problems.append(
            f"{len(rows.errors)} rows cannot be converted (training stops at the first): {listed}"
            + (f"; and {more} more" if more > 0 else "")
        )
    if not rows.rendered:
        report.problems.append("no row can be converted: nothing to train on")
        return report
    encoded = encode_rendered(rows.rendered, tokenizer, completion_only=cfg.completion_only)
    _measure(report, encoded, cfg)
    _apply_policy(report, encoded, rows.where, cfg)
    _check_content(report, rows.conversations)
    _check_end_of_turn(report, encoded, tokenizer, cfg)
    report.example = _example_segments(rows.rendered, encoded, cfg)
    if cfg.eval:
        _check_eval(report, cfg)
    return report


def named_format(records: list[dict], cfg: DataConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    try:
        return detect_format(records, cfg.column_map)
    except DataError:
        return "unknown"


def _measure(report: PreflightReport, encoded: list[Encoded], cfg: DataConfig) -> None:
    totals = [len(e.input_ids) for e in encoded]
    report.lengths = {
        "prompt": LengthStats.of([e.prompt_len for e in encoded]),
        "response": LengthStats.of([e.response_len for e in encoded]),
        "total": LengthStats.of(totals),
    }
    report.over_max_length = sum(1 for n in totals if n > cfg.max_length)
    report.prompt_lost = sum(
        1 for e in encoded if len(e.input_ids) > cfg.max_length and e.response_len >= cfg.max_length
    )
    report.eot_lost = sum(1 for e in encoded if e.response_len > cfg.max_length)
    if report.over_max_length:
        report.suggested_max_length = suggest_max_length(totals)


def _apply_policy(
    report: PreflightReport, encoded: list[Encoded], where: list[str], cfg: DataConfig
) -> None:
    stats = TokenStats(rows_read=report.rows)
    # "error" would stop training at the first long row; report what it would hit instead.
    policy = "drop" if cfg.truncation == "error" else cfg.truncation
    for enc in encoded:
        stats.add(fit_to_length(enc, cfg.max_length, policy).outcome)
    report.stats = stats
    over, n = report.over_max_length, len(encoded)
    fix = f"data.max_length={report.suggested_max_length} fits 90% of rows"
    if over and cfg.truncation == "error":
        first = next(
            w for w, e in zip(where, encoded, strict=True) if len(e.input_ids) > cfg.max_length
        )
        report.problems.append(
            f"{over} rows are longer than max_length={cfg.max_length} and truncation=error "
            f"stops training at the first ({first}); {fix}, or use drop/truncate"
        )
    elif over and cfg.truncation == "drop":
        report.warnings.append(
            f"{over} of {n} rows ({over / n:.1%}) are longer than max_length={cfg.max_length} "
            f"and will be dropped; {fix}"
        )
    elif over:
        report.warnings.append(
            f"{over} of {n} rows ({over / n:.1%}) are longer than max_length={cfg.max_length} "
            f"and will lose the left of their prompt; {fix}"
        )
        if report.prompt_lost:
            report.warnings.append(
                f"{report.prompt_lost} rows lose their whole prompt (the response alone fills "
                f"max_length) and {report.eot_lost} lose the end of their response"
            )
    if stats.dropped_no_target:
        report.warnings.append(
            f"{stats.dropped_no_target} rows have no label token and are dropped"
        )
    if stats.kept == 0:
        report.problems.append(_nothing_kept(report, stats))


def _nothing_kept(report: PreflightReport, stats: TokenStats) -> str:
    if stats.dropped_too_long:
        prompt, total = report.lengths["prompt"], report.lengths["total"]
        why = (
            f"max_length={report.max_length} is shorter than every prompt (the shortest prompt "
            f"is {prompt.min} tokens)"
            if prompt.min >= report.max_length
            else f"every row is longer than max_length={report.max_length} (the shortest is "
            f"{total.min} tokens)"
        )
        return f"no rows left: {why}; set data.max_length to about {report.suggested_max_length}"
    return "no rows left: every label is masked, so there is nothing to learn"


def _check_content(report: PreflightReport, conversations: list[Any]) -> None:
    keys = Counter(json.dumps(c, sort_keys=True, ensure_ascii=False) for c in conversations)
    report.duplicates = sum(n - 1 for n in keys.values())
    report.empty_targets = sum(1 for c in conversations if _empty_target(c))
    if report.duplicates:
        report.warnings.append(f"{report.duplicates} rows are exact duplicates of another row")
    if report.empty_targets:
        report.warnings.append(
            f"{report.empty_targets} rows have an empty response: the model learns to answer "
            "with nothing"
        )


def _empty_target(conv: Any) -> bool:
    if isinstance(conv, dict):
        return not conv.get("text", "").strip()
    return any(m["role"] == "assistant" and not m["content"].strip() for m in conv)


def special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(i for i, tok in decoder.items() if getattr(tok, "special", False))
    return ids


def _check_end_of_turn(
    report: PreflightReport, encoded: list[Encoded], tokenizer: Any, cfg: DataConfig
) -> None:
    """The last trained token of a reply must be one generation can stop on."""
    ends = Counter(_last_target(e) for e in encoded)
    ends.pop(None, None)
    if not ends:
        return
    eot_id, _ = ends.most_common(1)[0]
    report.eot_token = tokenizer.convert_ids_to_tokens(eot_id)
    specials = special_ids(tokenizer)
    policy = "drop" if cfg.truncation == "error" else cfg.truncation
    fitted = [fit_to_length(e, cfg.max_length, policy).example for e in encoded]
    kept_with_eot = sum(1 for f in fitted if f is not None and eot_id in f.labels)
    report.eot_in_loss = eot_id in specials and kept_with_eot > 0
    if eot_id not in specials:
        report.problems.append(
            f"replies end with '{report.eot_token}', not an end-of-turn token: the model never "
            "learns to stop (the chat template's end marker is not one token of this tokenizer, "
            "or the template has none); set model.chat_template to one that fits the tokenizer"
        )
    elif kept_with_eot == 0 and report.stats.kept:
        report.problems.append(
            f"no kept row has its end-of-turn token '{report.eot_token}' in the loss (truncation "
            "cuts it away): the model never learns to stop; raise data.max_length"
        )
    elif eot_id != tokenizer.eos_token_id:
        report.warnings.append(
            f"replies end with '{report.eot_token}', not the tokenizer's EOS "
            f"'{tokenizer.eos_token}': generation must also stop on it"
        )


def _last_target(enc: Encoded) -> int | None:
    """The last trained token of the row's first reply: its end-of-turn, if the template has one."""
    start = next((i for i, x in enumerate(enc.labels) if x != IGNORE_INDEX), None)
    if start is None:
        return None
    end = start
    while end + 1 < len(enc.labels) and enc.labels[end + 1] != IGNORE_INDEX:
        end += 1
    return enc.input_ids[end]


def _example_segments(
    rendered: list[Rendered], encoded: list[Encoded], cfg: DataConfig
) -> list[tuple[str, bool]]:
    """The first row that fits, cut into (text, trained) runs by the labelled tokens' offsets."""
    index = next((i for i, e in enumerate(encoded) if len(e.input_ids) <= cfg.max_length), 0)
    text, enc = rendered[index].text, encoded[index]
    trained = [False] * len(text)
    for (a, b), label in zip(enc.offsets, enc.labels, strict=True):
        if label != IGNORE_INDEX:
            trained[a:b] = [True] * (b - a)
    segments: list[tuple[str, bool]] = []
    for ch, flag in zip(text, trained, strict=True):
        if segments and segments[-1][1] == flag:
            segments[-1] = (segments[-1][0] + ch, flag)
        else:
            segments.append((ch, flag))
    return segments


def _check_eval(report: PreflightReport, cfg: DataConfig) -> None:
    try:
        located = read_located(cfg.eval, split=cfg.split)
        resolve_format(located.records, cfg, source=cfg.eval)
    except DataError as err:
        report.problems.append(f"eval data: {err}")
        return
    report.eval_rows = len(located)


def _prompt_rows(report: PreflightReport) -> list[tuple[str, str]]:
    """The summary table of a prompt report (see `render_report`)."""
    s = report.stats
    budget = "none" if report.prompt_budget is None else f"{report.prompt_budget} tokens"
    return [
        ("source", report.source),
        ("format", report.format),
        ("rows read / usable prompts", f"{report.rows} / {report.valid_rows}"),
        ("prompt budget (max_length - max_new_tokens)", budget),
        ("kept for training", str(s.kept)),
        (f"truncation={report.truncation}", f"{s.dropped_too_long} dropped, {s.truncated} cut"),
        ("prompts differ (pairs dropped)", str(report.prompt_mismatch)),
        ("duplicate prompts", str(report.duplicates)),
        ("empty prompts", str(report.empty_prompts)),
    ]


def render_report(report: PreflightReport, console: Any) -> None:
    """Print the report with rich: summary, token lengths, the example with its mask, findings."""
    from rich.table import Table
    from rich.text import Text

    preference = report.kind == "preference"
    titles = {
        "preference": "Preference data preflight",
        "prompts": "PPO prompt preflight",
        "unpaired": "KTO data preflight",
    }
    summary = Table(title=titles.get(report.kind, "SFT data preflight"), show_header=False)
    summary.add_column("", style="bold")
    summary.add_column("")
    rows_of = {"prompts": _prompt_rows, "preference": _preference_rows, "unpaired": _kto_rows}
    rows = rows_of.get(report.kind, _sft_rows)(report)
    rows += [("eval rows", str(report.eval_rows))] if report.eval_rows is not None else []
    for key, value in rows:
        summary.add_row(key, Text(value))  # a path or token is text: "[/x]" is not markup
    console.print(summary)
    if report.lengths:
        console.print(_lengths_table(report, Table))
    examples = [("Example", report.example)]
    if preference:
        examples = [
            ("Example, chosen", report.example),
            ("Example, rejected", report.example_rejected),
        ]
    for title, segments in examples:
        if not segments:
            continue
        text = Text()
        for chunk, trained in segments:
            text.append(chunk, style="bold green" if trained else "dim")
        legend = "bold green = in the loss, dim = masked"
        if report.kind == "prompts":
            title, legend = "Example prompt", "as rendered; the response is generated after it"
        console.print(Text(f"{title} ({legend}):", style="bold"))
        console.print(text)
    for problem in report.problems:
        console.print(Text(f"PROBLEM: {problem}", style="bold red"))
    for warning in report.warnings:
        console.print(Text(f"warning: {warning}", style="yellow"))
    if report.ok:
        console.print(Text("No problems found.", style="green"))


def _sft_rows(report: PreflightReport) -> list[tuple[str, str]]:
    s = report.stats
    return [
        ("source", report.source),
        ("format", report.format),
        ("rows read / convertible", f"{report.rows} / {report.valid_rows}"),
        ("kept for training", str(s.kept)),
        (f"truncation={report.truncation}", f"{s.dropped_too_long} dropped, {s.truncated} cut"),
        ("dropped: no label token", str(s.dropped_no_target)),
        ("exact duplicates", str(report.duplicates)),
        ("empty responses", str(report.empty_targets)),
        (
            "end-of-turn token",
            f"{report.eot_token} ({'in' if report.eot_in_loss else 'NOT in'} the loss)",
        ),
        ("loss on", "responses only" if report.completion_only else "every token"),
    ]


def _preference_rows(report: PreflightReport) -> list[tuple[str, str]]:
    s = report.stats
    return [
        ("source", report.source),
        ("format", report.format),
        ("rows read / usable pairs", f"{report.rows} / {report.valid_rows}"),
        ("kept for training", str(s.kept)),
        (
            f"truncation={report.truncation}",
            f"{s.dropped_too_long} dropped, {s.truncated} prompts cut, "
            f"{report.damaged} damaged (a response alone fills max_length)",
        ),
        ("prompts differ (dropped)", str(report.prompt_mismatch)),
        ("chosen == rejected", str(report.identical_pairs)),
        ("duplicate pairs", str(report.duplicates)),
        ("empty responses", str(report.empty_targets)),
        (
            "end-of-turn token",
            f"{report.eot_token} ({'in' if report.eot_in_loss else 'NOT in'} the responses)",
        ),
    ]


def _kto_rows(report: PreflightReport) -> list[tuple[str, str]]:
    s = report.stats
    return [
        ("source", report.source),
        ("format", report.format),
        ("rows read / usable rows", f"{report.rows} / {report.valid_rows}"),
        ("examples kept for training", str(s.kept)),
        ("desirable / undesirable", f"{report.desirable} / {report.undesirable}"),
        (
            f"truncation={report.truncation}",
            f"{s.dropped_too_long} dropped, {s.truncated} prompts cut, "
            f"{report.damaged} damaged (a completion alone fills max_length)",
        ),
        ("pairs whose prompts differ (dropped)", str(report.prompt_mismatch)),
        ("duplicate examples", str(report.duplicates)),
        ("empty completions", str(report.empty_targets)),
        (
            "end-of-turn token",
            f"{report.eot_token} ({'in' if report.eot_in_loss else 'NOT in'} the completions)",
        ),
    ]


def _lengths_table(report: PreflightReport, table_cls: Any) -> Any:
    table = table_cls(title=f"Tokens per row (max_length={report.max_length})")
    # PPO prompts are held to the budget the response leaves, not to max_length itself
    prompts = report.kind == "prompts"
    limit = (report.prompt_budget or 0) if prompts else report.max_length
    flagged = "prompt" if prompts else "total"
    for col in ("", "min", "p50", "p90", "p99", "max"):
        table.add_column(col, justify="right" if col else "left")
    for name, stats in report.lengths.items():
        cells = [stats.min, stats.p50, stats.p90, stats.p99, stats.max]
        styled = [f"[red]{v}[/red]" if name == flagged and v > limit else str(v) for v in cells]
        table.add_row(name, *styled)
    what = {
        "preference": "pairs (prompt + longest response)",
        "unpaired": "examples (prompt + completion)",
    }.get(report.kind, "rows")
    table.caption = f"{report.over_max_length} {what} longer than max_length"
    if prompts:
        table.caption = f"{report.over_max_length} prompts longer than the prompt budget ({limit})"
    return table
